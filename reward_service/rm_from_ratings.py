"""The next reward model from a run's ratings (`rlhf train-rm --from-run RUN_DIR`).

The ratings the review page collected (`ratings.py`: pairs.jsonl from A/B picks, labels.jsonl from
likes) are split once, by seed, into a training part and a held-out part (`eval_fraction`, at
least one rating). The training part, plus the original training data when one is configured,
is written as one dataset file in the objective's format and trained on with
`train_rm.train_reward_model`; the new model is then scored on the held-out ratings only, so the
accuracy reported is on judgements it never saw:
    pairs:  share of held-out (chosen, rejected) the model ranks chosen above rejected;
    labels: share of held-out (liked, disliked) pairs ranked right (when both kinds are held out),
            else the share of held-out labels whose sign it gets right.
Objective: bradley_terry when there are A/B pairs, else bce on the labels (or as asked).
The split and training files are kept beside the model (`<output_dir>.data/`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contract.atomic import write_atomically
from contract.config_base import ConfigError
from contract.datasets import load_labels, load_preferences
from reward_service.config import RewardModelTrainConfig
from reward_service.ratings import LABELS, PAIRS, RatingStore
from reward_service.versions import ModelVersions

TRAIN_KEYS = ("epochs", "batch_size", "lr", "max_length", "seed")
COLUMNS = {"bradley_terry": ("prompt", "chosen", "rejected"), "bce": ("prompt", "response", "label")}


def current_model_dir(store_dir: str | Path) -> str | None:
    """The reward model the run's app scores with now (its newest version), if it has one."""
    last = ModelVersions(store_dir).latest() if (Path(store_dir) / "reward_models.jsonl").is_file() else None
    return last["model_dir"] if last else None


def _original_rows(path: str, objective: str) -> list[dict]:
    """Rows of the original training data in the shape of the ratings files (a conversation prompt
    goes back out as its message list, which the dataset reader accepts)."""
    t = load_preferences(path) if objective == "bradley_terry" else load_labels(path)
    rows = []
    for r in t.to_pylist():
        prompt = json.loads(r["messages"]) if r.get("messages") else r["prompt"]
        rows.append({"prompt": prompt, **{k: r[k] for k in COLUMNS[objective][1:]}})
    return rows


def split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    n = len(rows)
    n_eval = max(1, round(eval_fraction * n))
    if n - n_eval < 1:
        raise ConfigError(f"{n} rating(s): too few to hold out {n_eval} and train on the rest; rate more samples")
    order = np.random.default_rng(seed).permutation(n)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def both_classes_first(rows: list[dict], seed: int) -> list[dict]:
    """`train_reward_model` holds out the first `n_eval` rows of `default_rng(seed).permutation(n)` and,
    for bce, needs a liked and a disliked example there. With n_eval = 2, put one of each at those
    two positions (all other rows keep their order)."""
    rows = list(rows)
    first, second = np.random.default_rng(seed).permutation(len(rows))[:2]
    for slot, label in ((first, 1), (second, 0)):  # after the first swap rows[first] is liked: never picked again
        found = next((i for i, r in enumerate(rows) if r["label"] == label), None)
        if found is None:
            raise ConfigError(f"labels: no {'liked' if label else 'disliked'} rating to train on; bce needs both")
        rows[slot], rows[found] = rows[found], rows[slot]
    return rows


def heldout_accuracy(model_dir: str, objective: str, rows: list[dict], max_length: int) -> dict:
    from reward_service.model import RewardModel

    rm = RewardModel(model_dir, max_length=max_length)
    prompts = [r["prompt"] for r in rows]
    if objective == "bradley_terry":
        s = rm.score(prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
        return {"heldout_accuracy": float((s[:len(rows)] > s[len(rows):]).mean()), "heldout_metric": "pairwise"}
    s = rm.score(prompts, [r["response"] for r in rows])
    label = np.asarray([r["label"] for r in rows]) == 1
    pos, neg = s[label], s[~label]
    if len(pos) and len(neg):
        return {"heldout_accuracy": float((pos[:, None] > neg[None, :]).mean()), "heldout_metric": "pairwise"}
    return {"heldout_accuracy": float(((s > 0) == label).mean()), "heldout_metric": "label sign"}


def train_from_ratings(ratings_dir: str | Path, base_model: str, output_dir: str | Path, *,
                       objective: str | None = None, original_data: str | None = None,
                       eval_fraction: float = 0.2, log=print, **train: object) -> dict:
    """Train the next reward model on the ratings in `ratings_dir`; returns held-out accuracy and counts."""
    store = RatingStore(ratings_dir)
    pairs, labels = store.read(PAIRS), store.read(LABELS)
    objective = objective or ("bradley_terry" if pairs else "bce")
    rated = pairs if objective == "bradley_terry" else labels
    if not rated:
        kind = "A/B picks (pairs.jsonl)" if objective == "bradley_terry" else "likes or scores (labels.jsonl)"
        raise ConfigError(f"{ratings_dir}: no {kind} yet; rate samples on the review page first")
    rows = [{k: r[k] for k in COLUMNS[objective]} for r in rated]
    seed = int(train.get("seed", 0))
    train_rows, heldout = split(rows, eval_fraction, seed)
    original = _original_rows(original_data, objective) if original_data else []
    all_rows, inner_eval = original + train_rows, 1 if objective == "bradley_terry" else 2
    if len(all_rows) <= inner_eval:
        raise ConfigError(f"{len(train_rows)} rating(s) to train on: too few; rate more samples")
    if objective == "bce":
        all_rows = both_classes_first(all_rows, seed)
    data_dir = Path(output_dir).with_name(Path(output_dir).name + ".data")
    data_dir.mkdir(parents=True, exist_ok=True)
    train_file = data_dir / "train.jsonl"
    write_atomically(train_file, "".join(json.dumps(r) + "\n" for r in all_rows))
    write_atomically(data_dir / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in heldout))
    unknown = set(train) - set(TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"train-rm --from-run: unknown setting(s) {sorted(unknown)}; allowed: {', '.join(TRAIN_KEYS)}")
    cfg = RewardModelTrainConfig(base_model=str(base_model), data=str(train_file), output_dir=str(output_dir),
                                 objective=objective, eval_fraction=inner_eval / len(all_rows), **train)
    from reward_service.train_rm import train_reward_model

    log(f"train-rm: {len(train_rows)} rating(s) + {len(original)} original example(s), objective {objective}, "
        f"{len(heldout)} rating(s) held out; from {base_model}")
    metrics = train_reward_model(cfg)
    out = heldout_accuracy(str(output_dir), objective, heldout, cfg.max_length)
    return {**out, "num_heldout": len(heldout), "num_train_ratings": len(train_rows), "num_original": len(original),
            "objective": objective, "output_dir": str(output_dir), "base_model": str(base_model),
            "ignored": len(labels) if objective == "bradley_terry" else len(pairs), "train": metrics}
