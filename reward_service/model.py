"""A reward model: any HF one-output sequence-classification directory, scoring (prompt, response).

The one place that turns a pair into token ids, so the Serve replicas, the direct baseline in the
benchmark and `train_rm` all see exactly the same input. A plain pair is the text
`prompt + response` (what the policy actually emitted after the prompt), preceded by BOS. A pair
whose prompt came as chat messages is re-rendered in the REWARD MODEL's own chat template:
messages + {"role": "assistant", "content": response}. The RM may be another family than the
policy (a Llama-3 RM scoring a Qwen2 policy), so policy token ids or the policy-rendered prompt
text are never reused; without a template of its own the RM scores the policy-rendered text.
Either way the ids are cut from the left so the response end survives (a leading BOS is kept),
and right-padded with the pad token the model's config names (Llama classifiers pool the last
non-pad token, so a wrong pad id silently scores padding).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Stands in for the response while the template renders, so the response itself is tokenized on
# its own (its special-token text split, never control) and the template's text around it is not.
_SLOT = "RLHFRESPONSESLOT0x5f3759df"


def encode_pairs(tok, prompts: list[str], responses: list[str], max_length: int,
                 messages: list[str | None] | None = None) -> list[list[int]]:
    """Token ids per pair; special-token text inside a response is split, never treated as control.
    `messages` (JSON conversations, None per plain row): rows set are rendered in `tok`'s own chat
    template when it has one (see the module docstring)."""
    from contract.chat import has_template

    chat_rows = [i for i, m in enumerate(messages or []) if m is not None] if has_template(tok) else []
    chat_set = set(chat_rows)
    plain = [i for i in range(len(prompts)) if i not in chat_set]
    out: list[list[int]] = [[] for _ in prompts]
    texts = [prompts[i] + responses[i] for i in plain]
    ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    keep = max_length - len(head)
    for i, x in zip(plain, ids):
        out[i] = head + x[-keep:] if x else head
    for i in chat_rows:
        out[i] = _cut_left(tok, encode_conversation(tok, json.loads(messages[i]), responses[i]), max_length)
    return [x if x else [tok.eos_token_id] for x in out]


def encode_conversation(tok, messages: list[dict], response: str) -> list[int]:
    """messages + the response as the assistant's turn, in `tok`'s chat template: the template's
    text around the reply is tokenized with its special tokens, the reply (as the template wrote
    it, e.g. trimmed) with special-token text split."""
    from contract.chat import render

    text = render(tok, [*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
    before, slot, after = render(tok, [*messages, {"role": "assistant", "content": _SLOT}],
                                 add_generation_prompt=False).partition(_SLOT)
    if not slot or not text.startswith(before) or not text.endswith(after) or len(before) + len(after) > len(text):
        return tok(text, add_special_tokens=False)["input_ids"]  # a template that rewrites content unpredictably
    reply = text[len(before):len(text) - len(after)]
    return (tok(before, add_special_tokens=False)["input_ids"]
            + tok(reply, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            + tok(after, add_special_tokens=False)["input_ids"])


def _cut_left(tok, ids: list[int], max_length: int) -> list[int]:
    if len(ids) <= max_length:
        return ids
    head = ids[:1] if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else []
    return head + ids[len(ids) - (max_length - len(head)):]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def load_classifier(model_dir: str | Path, pad_token_id: int):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
    if model.config.num_labels != 1:
        raise ValueError(f"{model_dir}: reward model must have exactly one output (num_labels=1), "
                         f"found {model.config.num_labels}")
    model.config.pad_token_id = pad_token_id
    return model


class RewardModel:
    """Inference wrapper: `score(prompts, responses) -> float64 array` (NaN stays NaN: callers check)."""

    def __init__(self, model_dir: str | Path, max_length: int = 512, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_classifier(model_dir, self.tokenizer.pad_token_id).eval()
        self.max_length = max_length

    def score(self, prompts: list[str], responses: list[str], messages: list[str | None] | None = None
              ) -> np.ndarray:
        """`messages`: per pair the prompt's conversation as JSON, or None (see `encode_pairs`)."""
        if not prompts:
            return np.zeros(0, dtype=np.float64)
        seqs = encode_pairs(self.tokenizer, prompts, responses, self.max_length, messages)
        ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[:, 0].double().numpy()
