"""Data as users have it: chat prompts rendered with the policy's template, `datasets` directories,
every public preference shape, and one-line errors naming the file, row and field."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract import chat
from contract.datasets import Columns, DatasetError, load_labels, load_preferences, load_prompts, load_sft

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def policy_tok(tiny_chat_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_models["policy"])


def test_chat_prompts_are_rendered_with_the_policy_template(tmp_path, policy_tok):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "Name a colour."}]},
            {"id": "b", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "reference reply, dropped"}]},
            {"id": "c", "prompt": "plain text stays as it is"}]
    t = load_prompts(jsonl(tmp_path / "p.jsonl", rows), tokenizer=policy_tok)
    assert t.column_names == ["prompt_id", "prompt", "messages"]
    assert t.column("prompt").to_pylist() == [
        SYSTEM + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "plain text stays as it is"]
    msgs = t.column("messages").to_pylist()
    assert json.loads(msgs[0]) == [{"role": "user", "content": "Name a colour."}]
    assert [m["role"] for m in json.loads(msgs[1])] == ["system", "user"]  # the trailing reply is the policy's to write
    assert msgs[2] is None
    # Rendered text carries its special tokens already: tokenized without the tokenizer's own.
    ids = chat.encode_prompts(policy_tok, t.column("prompt").to_pylist(), msgs)
    assert ids[0][:1] == [policy_tok.convert_tokens_to_ids("<|im_start|>")]
    suffix = policy_tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[0][-len(suffix):] == suffix


def test_columns_are_configurable_and_json_conversations_are_read(tmp_path, policy_tok):
    conv = [{"role": "user", "content": "red?"}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"uid": [10, 11], "conversation": [json.dumps(conv), None], "question": [None, "q"]}), path)
    cols = Columns(id="uid", messages="conversation", prompt="question")
    t = load_prompts(path, cols, tokenizer=policy_tok)
    assert t.column("prompt_id").to_pylist() == ["10", "11"]
    assert t.column("prompt").to_pylist() == [SYSTEM + "<|im_start|>user\nred?<|im_end|>\n<|im_start|>assistant\n", "q"]
    # TRL's conversational prompt-only shape: the prompt column itself holds the messages.
    t = load_prompts(jsonl(tmp_path / "trl.jsonl", [{"prompt": conv}]), tokenizer=policy_tok)
    assert json.loads(t.column("messages")[0].as_py()) == conv


def test_save_to_disk_directories_are_read(tmp_path, policy_tok):
    import datasets

    conv = [{"role": "user", "content": "blue"}]
    datasets.Dataset.from_list([{"messages": conv}, {"messages": conv}]).save_to_disk(tmp_path / "ds")
    t = load_prompts(tmp_path / "ds", tokenizer=policy_tok)
    assert t.num_rows == 2 and t.column("prompt_id").to_pylist() == ["0", "1"]
    dd = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(
                                   [{"prompt": "p", "chosen": "a good", "rejected": "a bad"}]),
                               "test_prefs": datasets.Dataset.from_list(
                                   [{"prompt": "q", "chosen": "x", "rejected": "y"}] * 2)})
    dd.save_to_disk(tmp_path / "dd")
    assert load_preferences(tmp_path / "dd", Columns(split="test_prefs")).num_rows == 2
    with pytest.raises(DatasetError, match=r"split None not found; the directory has splits \['train_prefs', "
                                           r"'test_prefs'\] \(set split\)"):
        load_preferences(tmp_path / "dd")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DatasetError, match="not one written by datasets' save_to_disk"):
        load_prompts(tmp_path / "plain_dir")


def test_every_preference_shape_becomes_pairs(tmp_path):
    u = {"role": "user", "content": "Pick a colour"}
    a = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    rows = [
        # explicit prompt, text replies
        {"prompt": "P", "chosen": "red", "rejected": "dog"},
        # Anthropic HH: the prompt is implicit in both texts
        {"chosen": "\n\nHuman: colour?\n\nAssistant: I like red", "rejected": "\n\nHuman: colour?\n\nAssistant: I am a dog"},
        # full conversations, no prompt column value
        {"chosen": [u, a("red")], "rejected": [u, a("dog")]},
        # ultrafeedback_binarized: prompt text + conversations that repeat it
        {"prompt": "Pick a colour", "chosen": [u, a("red")], "rejected": [u, a("dog")]},
        # TRL conversational: prompt messages + one-message replies
        {"prompt": [u], "chosen": [a("red")], "rejected": [a("dog")]},
    ]
    # One file per row: a JSONL column has one type.
    got = [load_preferences(jsonl(tmp_path / f"p{i}.jsonl", [r])).to_pylist()[0] for i, r in enumerate(rows)]
    assert got[0] == {"prompt": "P", "messages": None, "chosen": "red", "rejected": "dog"}
    assert got[1] == {"prompt": "\n\nHuman: colour?\n\nAssistant: I", "messages": None, "chosen": " like red",
                      "rejected": " am a dog"}
    for g in got[2:]:
        assert (json.loads(g["messages"]), g["chosen"], g["rejected"]) == ([u], "red", "dog"), g
    labels = load_labels(jsonl(tmp_path / "kto.jsonl", [{"prompt": [u], "completion": [a("red")], "label": True},
                                                        {"prompt": [u], "completion": [a("dog")], "label": False}]))
    assert labels.column("response").to_pylist() == ["red", "dog"]
    assert labels.column("label").to_pylist() == [1.0, 0.0]
    assert json.loads(labels.column("messages")[0].as_py()) == [u]


def test_sft_examples_from_messages_and_from_prompt_response(tmp_path):
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}
    t = load_sft(jsonl(tmp_path / "s.jsonl", [{"messages": [u, a]}, {"prompt": "p", "response": "r"}]))
    assert [json.loads(m) if m else None for m in t.column("messages").to_pylist()] == [[u, a], None]
    assert t.column("prompt").to_pylist() == [None, "p"] and t.column("response").to_pylist() == [None, "r"]
    t = load_sft(jsonl(tmp_path / "c.jsonl", [{"prompt": [u], "completion": [a]}]))
    assert json.loads(t.column("messages")[0].as_py()) == [u, a]


@pytest.mark.parametrize("loader, rows, message", [
    (load_preferences, [{"prompt": "p", "chosen": 3, "rejected": "r"}],
     "row 0: field 'chosen' must be text or a list of {role, content} messages (got int)"),
    (load_preferences, [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": 3, "rejected": "r"}],
     "cannot be parsed: JSON parse error: Column(/chosen) changed from string to number in row 1"),
    (load_preferences, [{"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]}],
     "row 0: fields 'chosen' and 'rejected' must both be text or both be message lists"),
    (load_preferences, [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "more"}]}],
     "row 0: field 'rejected' must end in exactly one assistant reply after the shared prompt (got roles "
     "['assistant', 'user'] after it)"),
    (load_preferences, [{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                         "content": "b"}]}],
     "row 0: fields 'chosen'/'rejected' share no prompt messages and there is no 'prompt'"),
    (load_preferences, [{"prompt": "p", "chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}],
     "row 0: field 'chosen'[0].content must be a string (got missing)"),
    (load_preferences, [{"prompt": "p", "chosen": "c"}], "missing column 'rejected'"),
    (load_labels, [{"prompt": "p", "response": "r", "label": 2}],
     "column 'label' must be 0 or 1 (or a boolean); row 0 has 2.0"),
    (load_prompts, [{"messages": [{"role": "user", "content": 5}]}], "row 0: field 'messages'[0].content must be a string"),
    (load_prompts, [{"messages": [{"role": "assistant", "content": "hi"}]}],
     "row 0: field 'messages' has only an assistant reply"),
    (load_prompts, [{"messages": []}], "row 0: field 'messages' must be a non-empty list"),
    (load_sft, [{"messages": [{"role": "user", "content": "q"}]}], "row 0: field 'messages' has no assistant message"),
])
def test_bad_shapes_are_one_line_naming_file_row_and_field(tmp_path, policy_tok, loader, rows, message):
    path = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError) as e:
        loader(path, tokenizer=policy_tok) if loader is load_prompts else loader(path)
    text = str(e.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text, text


def test_a_conversation_needs_a_tokenizer_with_a_template(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    plain_tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}, {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DatasetError, match="row 1 is a conversation, but the policy tokenizer .* has no chat template"):
        load_prompts(path, tokenizer=plain_tok)


def test_a_template_that_writes_bos_is_not_given_a_second_one(tmp_path, tiny_chat_models):
    """Llama-3-style: the template writes <|begin_of_text|> and plain tokenization adds it too."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_models["reward"])  # the Llama-3-template tokenizer
    t = load_prompts(jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                                  {"prompt": "plain"}]), tokenizer=tok)
    assert t.column("prompt")[0].as_py().startswith("<|begin_of_text|><|start_header_id|>user")
    ids = chat.encode_prompts(tok, t.column("prompt").to_pylist(), t.column("messages").to_pylist())
    assert tok(t.column("prompt")[0].as_py())["input_ids"][:2] == [tok.bos_token_id] * 2  # the trap
    assert ids[0][0] == tok.bos_token_id and ids[0][1] != tok.bos_token_id
    assert ids[1][0] == tok.bos_token_id  # a plain prompt keeps the tokenizer's BOS
