"""A reward model: any HF one-output sequence-classification directory, scoring (prompt, response).

The one place that turns a pair into token ids, so the Serve replicas, the direct baseline in the
benchmark and `train_rm` all see exactly the same input. A pair is the text `prompt + response`
(what the policy actually emitted after the prompt), preceded by BOS, cut from the left so the
response end survives, and right-padded with the pad token the model's config names (Llama
classifiers pool the last non-pad token, so a wrong pad id silently scores padding).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_pairs(tok, prompts: list[str], responses: list[str], max_length: int) -> list[list[int]]:
    """Token ids per pair; special-token text inside a response is split, never treated as control."""
    texts = [p + r for p, r in zip(prompts, responses)]
    ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    keep = max_length - len(head)
    out = [head + x[-keep:] if x else head for x in ids]
    return [x if x else [tok.eos_token_id] for x in out]


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

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros(0, dtype=np.float64)
        seqs = encode_pairs(self.tokenizer, prompts, responses, self.max_length)
        ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[:, 0].double().numpy()
