"""`rlhf train-rm`: fit a one-output sequence classifier to human preferences, save it as an HF dir.

Objectives: Bradley-Terry on pairs, loss = -log sigmoid(s(chosen) - s(rejected)); or pointwise
binary cross-entropy on like/dislike labels. Held-out pairwise accuracy is the fraction of
held-out (chosen, rejected) pairs (for labels: of (liked, disliked) pairs) the model ranks right.
Plain torch in one process: reward models here are small and world size 1 is what the issue asks
to support without DeepSpeed. Inputs go through `model.encode_pairs`, the same path the Serve app
uses, so the model is trained on exactly what it will be asked to score.

`base_model` is a one-output sequence classifier, or a causal LM (the policy, an SFT output, a
pretrained instruct model): then its transformer body gets a new one-output score head,
`AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1)`, the head drawn from `seed`,
and the saved directory is a classifier the reward service serves as it is.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.atomic import staged_dir
from contract.config_base import ConfigError
from contract.datasets import load_labels, load_preferences
from reward_service.config import RewardModelTrainConfig
from reward_service.model import encode_pairs, load_classifier, load_tokenizer, pad_batch


CAUSAL_LM = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # architectures suffixes of an LM


def causal_lm_arch(model_dir: str | Path) -> str | None:
    """The causal-LM class config.json names (None for a classifier or anything else)."""
    archs = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    return next((a for a in archs if a.endswith(CAUSAL_LM)), None)


def load_base(base_model: str, pad_token_id: int, seed: int, log: Callable[[str], None]):
    """The model train-rm starts from: the classifier as it is, or a causal LM's body with a new
    one-output head (initialised from `seed`, so a run is reproducible)."""
    arch = causal_lm_arch(base_model)
    if arch is None:
        return load_classifier(base_model, pad_token_id)
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head as missing: the line below says it
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(base_model), num_labels=1,
                                                                   dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(before)
    model.config.pad_token_id = pad_token_id
    log(f"train-rm: base_model {base_model} is a causal LM ({arch}): training its transformer body with a new "
        f"one-output score head as {type(model).__name__} (head initialised from seed {seed})")
    return model


def _examples(cfg: RewardModelTrainConfig) -> dict[str, list]:
    """Columns as lists; `messages` holds each row's prompt conversation (JSON) or None."""
    if cfg.objective == "bradley_terry":
        t = load_preferences(cfg.data, cfg.columns)
        return {k: t.column(k).to_pylist() for k in ("prompt", "messages", "chosen", "rejected")}
    t = load_labels(cfg.data, cfg.columns)
    return {k: t.column(k).to_pylist() for k in ("prompt", "messages", "response", "label")}


def _check_template(ex: dict, tok, cfg: RewardModelTrainConfig) -> None:
    """Conversations are scored in the RM's own chat template: without one there is no text to train on."""
    from contract.chat import has_template

    chat_rows = [i for i, m in enumerate(ex["messages"]) if m is not None]
    if chat_rows and not has_template(tok):
        raise ConfigError(f"data: {cfg.data} row {chat_rows[0]} is a conversation, but base_model {cfg.base_model} "
                          f"has no chat template to render it; use a model with one or plain-text pairs")


class Scorer:
    """Scores token batches with the model being trained (grad on or off by the caller)."""

    def __init__(self, model, tok, max_length: int):
        self.model, self.tok, self.max_length = model, tok, max_length

    def __call__(self, prompts: list[str], responses: list[str], messages: list[str | None] | None = None
                 ) -> torch.Tensor:
        seqs = encode_pairs(self.tok, prompts, responses, self.max_length, messages)
        ids, mask = pad_batch(seqs, self.tok.pad_token_id)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0]


def _forward(score: Scorer, ex: dict, idx: np.ndarray, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry: (s_chosen, s_rejected) in one forward. BCE: (logits, labels)."""
    p = [ex["prompt"][i] for i in idx]
    m = [ex["messages"][i] for i in idx]
    if objective == "bradley_terry":
        s = score(p + p, [ex["chosen"][i] for i in idx] + [ex["rejected"][i] for i in idx], m + m)
        return s[:len(idx)], s[len(idx):]
    return (score(p, [ex["response"][i] for i in idx], m),
            torch.tensor([ex["label"][i] for i in idx], dtype=torch.float32))


def _loss(a: torch.Tensor, b: torch.Tensor, objective: str) -> torch.Tensor:
    if objective == "bradley_terry":
        return -F.logsigmoid(a - b).mean()
    return F.binary_cross_entropy_with_logits(a, b)


@torch.no_grad()
def _evaluate(score: Scorer, ex: dict, idx: np.ndarray, objective: str, batch: int) -> dict:
    """Held-out loss and pairwise accuracy."""
    firsts, seconds = [], []
    for b in range(0, len(idx), batch):
        x, y = _forward(score, ex, idx[b:b + batch], objective)
        firsts.append(x)
        seconds.append(y)
    a, b = torch.cat(firsts), torch.cat(seconds)
    out = {"eval_loss": float(_loss(a, b, objective))}
    if objective == "bradley_terry":
        out["eval_accuracy"] = float((a > b).double().mean())
        return out
    pos, neg = a[b == 1], a[b == 0]
    if not len(pos) or not len(neg):
        raise ConfigError("eval_fraction: the held-out split needs both liked and disliked examples; "
                          "raise eval_fraction or add data")
    out["eval_accuracy"] = float((pos[:, None] > neg[None, :]).double().mean())
    out["eval_label_accuracy"] = float(((a > 0) == (b == 1)).double().mean())
    return out


def _save_atomically(model, tok, output_dir: Path) -> None:
    with staged_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def train_reward_model(cfg: RewardModelTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate on the held-out split, save to cfg.output_dir; returns the metrics."""
    if cfg.num_ranks != 1:
        raise ConfigError(f"num_ranks: train-rm runs in one process (got {cfg.num_ranks}); set num_ranks: 1")
    if not (Path(cfg.base_model) / "config.json").is_file():
        raise ConfigError(f"base_model: {cfg.base_model} is not a model directory (no config.json)")
    ex = _examples(cfg)
    n = len(ex["prompt"])
    n_eval = max(1, round(cfg.eval_fraction * n))
    if n - n_eval < 1:
        raise ConfigError(f"data: {cfg.data} has {n} examples, too few to hold out {n_eval} for evaluation")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.base_model)
    _check_template(ex, tok, cfg)
    model = load_base(cfg.base_model, tok.pad_token_id, cfg.seed, log)
    score = Scorer(model, tok, cfg.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps, epoch_losses = 0, []
    for _ in range(cfg.epochs):
        model.train()
        rng.shuffle(train_idx)
        epoch_losses = []
        for b in range(0, len(train_idx), cfg.batch_size):
            loss = _loss(*_forward(score, ex, train_idx[b:b + cfg.batch_size], cfg.objective), cfg.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            epoch_losses.append(loss.item())
    model.eval()
    metrics = _evaluate(score, ex, eval_idx, cfg.objective, cfg.batch_size)
    _save_atomically(model, tok, Path(cfg.output_dir))
    return {**metrics, "train_loss": float(np.mean(epoch_losses)), "steps": steps, "num_train": len(train_idx),
            "num_eval": n_eval, "objective": cfg.objective, "output_dir": str(cfg.output_dir)}
