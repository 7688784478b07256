"""`rlhf train-rm`: fit a one-output sequence classifier to human preferences, save it as an HF dir.

Objectives: Bradley-Terry on pairs, loss = -log sigmoid(s(chosen) - s(rejected)); or pointwise
binary cross-entropy on like/dislike labels. Held-out pairwise accuracy is the fraction of
held-out (chosen, rejected) pairs (for labels: of (liked, disliked) pairs) the model ranks right.
Plain torch in one process: reward models here are small and world size 1 is what the issue asks
to support without DeepSpeed. Inputs go through `model.encode_pairs`, the same path the Serve app
uses, so the model is trained on exactly what it will be asked to score.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.atomic import staged_dir
from contract.config_base import ConfigError
from contract.datasets import load_labels, load_preferences
from reward_service.config import RewardModelTrainConfig
from reward_service.model import encode_pairs, load_classifier, load_tokenizer, pad_batch


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


def train_reward_model(cfg: RewardModelTrainConfig) -> dict:
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
    model = load_classifier(cfg.base_model, tok.pad_token_id)
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
