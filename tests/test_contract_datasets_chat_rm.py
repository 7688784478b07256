"""The reward model scores a conversation in ITS OWN chat template (a Llama-3 RM behind a Qwen2
ChatML policy: another tokenizer, other ids), re-rendered from the messages, never from policy ids."""
from __future__ import annotations

import json

import pytest
import torch

from reward_service.model import RewardModel, encode_pairs, load_tokenizer

CONV = [{"role": "user", "content": "Name a colour."}]
POLICY_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nName a colour."
                 "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def rm_tok(tiny_chat_models):
    return load_tokenizer(tiny_chat_models["reward"])


def test_rm_sees_its_own_template_text(rm_tok):
    ids = encode_pairs(rm_tok, [POLICY_PROMPT], [" red"], 128, [json.dumps(CONV)])[0]
    assert rm_tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour."
                                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>")  # trimmed, as Llama-3's template does
    assert ids[0] == rm_tok.bos_token_id and ids[-1] == rm_tok.convert_tokens_to_ids("<|eot_id|>")
    # nothing of the policy's template reaches the RM
    assert "im_start" not in rm_tok.decode(ids)
    # A plain row (no messages) is the old path: BOS + prompt + response.
    plain = encode_pairs(rm_tok, ["q:"], [" red"], 128, [None])[0]
    assert rm_tok.decode(plain) == "<|begin_of_text|>q: red"


def test_special_token_text_in_a_response_is_not_control(rm_tok):
    ids = encode_pairs(rm_tok, [""], ["red<|eot_id|>blue"], 128, [json.dumps(CONV)])[0]
    eot = rm_tok.convert_tokens_to_ids("<|eot_id|>")
    assert ids.count(eot) == 2  # the user turn's and the reply's end: the response's text is split


def test_long_conversations_are_cut_from_the_left_keeping_bos_and_the_reply_end(rm_tok):
    long = [{"role": "user", "content": "red " * 200}]
    ids = encode_pairs(rm_tok, [""], [" blue green"], 32, [json.dumps(long)])[0]
    assert len(ids) == 32 and ids[0] == rm_tok.bos_token_id
    assert rm_tok.decode(ids).endswith("<|end_header_id|>\n\nblue green<|eot_id|>")


def test_reward_model_scores_the_rerendered_conversation(tiny_chat_models, rm_tok):
    rm = RewardModel(tiny_chat_models["reward"], max_length=128)
    got = rm.score([POLICY_PROMPT, POLICY_PROMPT], [" red", " red"], [json.dumps(CONV), None])
    text = rm_tok.apply_chat_template(CONV + [{"role": "assistant", "content": " red"}], tokenize=False)
    ids = torch.tensor([rm_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        want = rm.model(input_ids=ids).logits[0, 0].item()
    assert got[0] == pytest.approx(want, abs=1e-5)
    assert got[1] != pytest.approx(want, abs=1e-5)  # without messages it scores the policy-rendered text


def colour_pairs(n: int, seed: int) -> list[dict]:
    """Distinct conversations (`good` / `bad` columns): a user question, and a reply with colour words
    (chosen) or without (rejected), words and lengths drawn per row, so no row repeats another."""
    import random

    from reward_service.functions import COLOURS, FILLER

    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        user = {"role": "user", "content": f"{rng.choice(['Name colours', 'Describe it', 'What do you see'])} "
                                           f"({rng.randrange(10_000)})"}
        good = rng.sample(COLOURS, rng.randint(2, 4)) + rng.sample(FILLER, rng.randint(0, 2))
        bad = rng.sample(FILLER, rng.randint(2, 5))
        rng.shuffle(good)
        row = {"good": [user, {"role": "assistant", "content": " ".join(good)}],  # configurable column names
               "bad": [user, {"role": "assistant", "content": " ".join(bad)}]}
        if (key := json.dumps(row)) not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def test_train_rm_on_conversations_in_its_own_template(tiny_chat_models, tiny_models, tmp_path):
    """Distinct rows, so the held-out accuracy is of conversations the model never saw (not recall of
    one memorised row); then fresh pairs, other questions and words, scored by the saved model."""
    from contract.config_base import ConfigError
    from reward_service.config import RewardModelTrainConfig
    from reward_service.train_rm import train_reward_model

    rows = colour_pairs(64, seed=0)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardModelTrainConfig(base_model=str(tiny_chat_models["reward"]), data=str(data),
                                 output_dir=str(tmp_path / "rm"), epochs=3, batch_size=8, lr=3e-3, eval_fraction=0.25,
                                 columns={"chosen": "good", "rejected": "bad"})
    out = train_reward_model(cfg)
    assert (out["num_train"], out["num_eval"]) == (48, 16)
    assert out["eval_accuracy"] >= 0.9, out
    assert (tmp_path / "rm" / "chat_template.jinja").is_file()
    fresh = [r for r in colour_pairs(40, seed=1) if r not in rows]
    rm = RewardModel(tmp_path / "rm", max_length=128)
    score = lambda col: rm.score([""] * len(fresh), [r[col][1]["content"] for r in fresh],  # noqa: E731
                                 [json.dumps(r[col][:1]) for r in fresh])
    agree = float((score("good") > score("bad")).mean())
    assert len(fresh) >= 30 and agree >= 0.9, agree
    with pytest.raises(ConfigError, match=r"row 0 is a conversation, but base_model .* has no chat template"):
        train_reward_model(cfg.model_copy(update={"base_model": str(tiny_models["reward"]),
                                                  "output_dir": str(tmp_path / "rm2")}))
    assert not (tmp_path / "rm2").exists()
