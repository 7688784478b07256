"""Closing the loop: the next reward model from a run's ratings, by hand or every N ratings.

`train_next` is `rlhf train-rm --from-run RUN_DIR`: it trains on RUN/reward_store/ratings/ (what the
review page collected) starting from the reward model the run scores with now, writes the model to
RUN/reward_models/rm-<stamp>/ and reports held-out accuracy on held-out ratings
(reward_service/rm_from_ratings.py). An `rlhf train-rm` YAML may add settings and the original
training data (`data`), which is trained on together with the ratings.

`RewardRefresh` is `reward.retrain_every: N`: after a step that brought the run to N more ratings
than the last retraining, the controller trains the next model in a background thread (the loop
goes on) and swaps it into the running reward app (`RewardClient.update_model`), logging both.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from cluster.config import apply_override, build, read_yaml
from cluster.errors import one_line
from contract.config_base import ConfigError

STORE, RATINGS, MODELS = "reward_store", "ratings", "reward_models"


def _config_model_dir(run_root: Path) -> str | None:
    cfg = run_root / "config.yaml"
    if not cfg.is_file():
        return None
    return (read_yaml(cfg).get("reward") or {}).get("model_dir")


def train_next(run_root: str | Path, config: str | None = None, overrides: list[str] = (), log=print) -> dict:
    """Train the next reward model on the run's ratings; returns the metrics (held-out accuracy ...)."""
    from reward_service.config import RewardModelTrainConfig
    from reward_service.rm_from_ratings import TRAIN_KEYS, current_model_dir, train_from_ratings

    root = Path(run_root).resolve()
    ratings = root / STORE / RATINGS
    if not ratings.is_dir():
        raise ConfigError(f"--from-run {run_root}: no ratings yet ({ratings} does not exist); rate samples on "
                          f"the run's review page first")
    tree = read_yaml(config) if config else {}
    for o in overrides:
        apply_override(tree, o)
    given = set(tree)
    original = tree.pop("data", None)
    tree.setdefault("base_model", current_model_dir(root / STORE) or _config_model_dir(root))
    if not tree["base_model"]:
        raise ConfigError(f"--from-run {run_root}: the run has no reward model to start from; set base_model=DIR")
    tree.setdefault("output_dir", str(root / MODELS / f"rm-{time.strftime('%Y%m%d-%H%M%S')}"))
    cfg = build(RewardModelTrainConfig, {**tree, "data": original or str(ratings)}, config or "train-rm --from-run")
    settings = {k: getattr(cfg, k) for k in TRAIN_KEYS if k in given}
    return train_from_ratings(ratings, cfg.base_model, cfg.output_dir, original_data=original, log=log,
                              objective=cfg.objective if "objective" in given else None,
                              eval_fraction=cfg.eval_fraction if "eval_fraction" in given else 0.2, **settings)


class RewardRefresh:
    """`reward.retrain_every`: retrain and swap the reward model after every N new ratings."""

    def __init__(self, every: int, config: str | None, run_root: Path, client, log):
        self.every, self.config, self.root, self.client, self.log = every, config, Path(run_root), client, log
        self.done_at = self._count() if every else 0  # ratings already there (a resumed run) are not "new"
        self._thread: threading.Thread | None = None

    def _count(self) -> int:
        s = self.client.summary()
        return int(s["pairs"] + s["labels"])

    def after_step(self, step: int) -> None:
        if not self.every or (self._thread is not None and self._thread.is_alive()):
            return
        n = self._count()
        if n - self.done_at >= self.every:
            self.done_at = n
            self._thread = threading.Thread(target=self._retrain, args=(n, step), name="rm-refresh", daemon=True)
            self._thread.start()

    def _retrain(self, n: int, step: int) -> None:
        try:
            self.log(f"reward model: retraining on {n} ratings (reward.retrain_every={self.every}, after step {step})")
            out = train_next(self.root, self.config, log=lambda m: None)
            entry = self.client.update_model(out["output_dir"])
            self.log(f"reward model v{entry['version']} <- {out['output_dir']} (held-out accuracy "
                     f"{out['heldout_accuracy']:.3f} on {out['num_heldout']} ratings)")
        except Exception as e:  # noqa: BLE001 - the job goes on with the model it has
            self.log(f"reward model: automatic retraining failed, still scoring with the current model ({one_line(e)})")


def review_paths(run_root: Path) -> dict:
    """What the review page reads: the per-step rollout files and the metrics of the run."""
    return {"rollouts_dir": str(Path(run_root) / "rollouts"), "metrics_file": str(Path(run_root) / "metrics.jsonl")}


def reward_started(cfg, run_root: Path, client, log) -> RewardRefresh:
    """Once the reward app is up: say where the review page is and how to sign in, record where
    this run's cluster is (RUN/cluster.json, for `rlhf reward-model update RUN DIR`), and return
    the automatic retraining hook (inactive unless reward.retrain_every is set)."""
    import json

    import ray

    from contract.atomic import write_atomically

    ctx = ray.get_runtime_context()
    write_atomically(Path(run_root) / "cluster.json", json.dumps({"address": ctx.gcs_address,
                                                                   "namespace": ctx.namespace}))
    log(f"review page {client.review_url}: {client.sign_in_hint()}")
    return RewardRefresh(cfg.reward.retrain_every, cfg.reward.retrain_config, run_root, client, log)
