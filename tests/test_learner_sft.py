"""Supervised fine-tuning: loss on the assistant tokens only, on DeepSpeed ranks, HF directory out.

The suite's one SFT run on DeepSpeed ranks (2 ranks, ZeRO-2: held-out and training loss down, the HF
directory, generation stopping at the end of a turn, tied embeddings) is the first stage of
test_cluster_chat_e2e.py, which trains PPO from its output: a second run here would cost a minute."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract import chat
from learner.sft import IGNORE, SFTDataError, conversation_labels, encode_table, nll_from_logits, pad_examples, plain_labels
from learner.sft_config import SFTConfig

CONV = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red blue"},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "green"}]


@pytest.fixture(scope="module")
def tok(tiny_chat_models):
    return AutoTokenizer.from_pretrained(tiny_chat_models["policy"])


def _targets(tok, ids, labels) -> str:
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])


def test_only_assistant_turns_are_targets(tok):
    ids, labels = conversation_labels(tok, CONV)
    assert ids == tok(chat.render(tok, CONV, False), add_special_tokens=False)["input_ids"]
    # each assistant turn with the template's end of turn: the model learns to stop
    assert _targets(tok, ids, labels) == "red blue<|im_end|>\ngreen<|im_end|>\n"
    masked = tok.decode([t for t, y in zip(ids, labels) if y == IGNORE])
    assert "Name a colour." in masked and "Another?" in masked and "You are a helpful assistant." in masked
    ids, labels = plain_labels(tok, "q: ", "red")
    assert _targets(tok, ids, labels) == "red<|im_end|>" and labels[0] == IGNORE


def test_a_prompt_tokens_logit_gets_no_gradient(tok, tiny_chat_models):
    import pyarrow as pa

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_models["policy"], dtype=torch.float32)
    enc = encode_table(tok, pa.table({"messages": [json.dumps(CONV)], "prompt": [None], "response": [None]}), 512, "t")
    batch = pad_examples(enc.ids, enc.labels, 1, tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits
    logits.retain_grad()
    nll, n = nll_from_logits(logits, batch["labels"])
    (nll / n).backward()
    labels = batch["labels"][0]
    grad_norm = logits.grad[0].norm(dim=-1)  # position t's logits predict token t+1
    predicts_target = torch.cat([labels[1:] != IGNORE, torch.tensor([False])])
    assert int(n) == int((labels != IGNORE).sum()) > 0
    assert torch.all(grad_norm[~predicts_target] == 0)  # prompt/user/system tokens: no gradient at all
    assert torch.all(grad_norm[predicts_target] > 0)


def test_turn_ends_become_generation_stops(tmp_path, tok):
    from transformers import GenerationConfig

    from learner.sft import stop_at_turn_ends, turn_ends

    ids, labels = conversation_labels(tok, CONV)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_ends(labels, set(tok.all_special_ids)) == {im_end}
    GenerationConfig(eos_token_id=7).save_pretrained(tmp_path)  # a base model whose EOS is not the turn end
    assert stop_at_turn_ends(tmp_path, frozenset({im_end})) == [7, im_end]
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [7, im_end]


def test_bad_examples_and_config_are_one_line(tok, tiny_models, tmp_path):
    import pyarrow as pa

    plain_tok = AutoTokenizer.from_pretrained(tiny_models["policy"])  # no chat template
    table = pa.table({"messages": [None, json.dumps(CONV)], "prompt": ["p", None], "response": ["r", None]})
    with pytest.raises(SFTDataError, match=r"^data.jsonl: row 1: tokenizer .* has no chat template$"):
        encode_table(plain_tok, table, 64, "data.jsonl")
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be a multiple of num_ranks x micro_batch_size \(4\)"):
        SFTConfig(base_model="m", data="d", output_dir="o", batch_size=6, micro_batch_size=2, num_ranks=2)


def test_cli_bad_inputs_are_one_line_exit_2_and_write_nothing(tiny_chat_models, tmp_path, capsys):
    from cluster.cli import main

    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}) + "\n")
    cases = [
        ({"base_model": str(tiny_chat_models["policy"]), "data": str(bad)},
         f"{bad}: row 0: field 'messages'[1].role must be a string (got missing)"),
        ({"base_model": str(tiny_chat_models["reward"]), "data": str(bad)},
         "base_model: " + str(tiny_chat_models["reward"]) + " is a LlamaForSequenceClassification, not a causal LM"),
        ({"base_model": str(tiny_chat_models["policy"]), "data": str(bad), "epochs": 0},
         "epochs: input should be greater than or equal to 1"),
    ]
    for i, (cfg, message) in enumerate(cases):
        path = tmp_path / f"sft{i}.yaml"
        path.write_text(json.dumps({**cfg, "output_dir": str(out)}))
        assert main(["train-sft", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["generate", str(tmp_path / "nowhere"), "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"CHECKPOINT {tmp_path / 'nowhere'} does not exist" in err and len(err.splitlines()) == 1
    assert not out.exists()
