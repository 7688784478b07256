"""Reward model versions of a running reward app: which model directory is version N.

`<store>/reward_models.jsonl`, one line per version: {version, model_dir, config_model_dir, time}.
Version 0 is `reward.model_dir` of the config. `rlhf reward-model update` appends version N+1;
every scorer replica loads it beside the old one and swaps between two forwards, and every score
it returns names the version that produced it (provenance column `reward_model_version`).
The file outlives the app: a resumed run keeps scoring with the newest version, unless its config
names a different `reward.model_dir`, which then becomes the next version.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from contract.config_base import ConfigError
from reward_service.feedback import append_lines, cut_torn_tail

FILE_NAME = "reward_models.jsonl"


def check_model_dir(model_dir: str | Path, key: str = "reward model") -> str:
    """The directory, resolved, if it holds a one-output HF sequence classifier; else a one-line error."""
    d = Path(model_dir).expanduser().resolve()
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        why = "does not exist" if not d.exists() else "has no config.json"
        raise ConfigError(f"{key}: {model_dir} {why}; expected a Hugging Face sequence-classification directory")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{key}: {cfg_file} is not valid JSON") from None
    labels = cfg.get("num_labels", len(cfg.get("id2label") or {0: 0}))
    archs = cfg.get("architectures") or []
    if labels != 1 or (archs and not any(a.endswith("ForSequenceClassification") for a in archs)):
        raise ConfigError(f"{key}: {model_dir} is not a one-output sequence classifier "
                          f"(architectures {archs}, {labels} labels)")
    return str(d)


class ModelVersions:
    def __init__(self, store_dir: str | Path):
        self.path = Path(store_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)
        self.entries: list[dict] = []
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if another process appended to it."""
        if self.path.is_file() and self.path.stat().st_size != getattr(self, "_size", -1):
            text = self.path.read_text(encoding="utf-8")
            self._size = len(text.encode("utf-8"))
            self.entries = [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def latest(self) -> dict | None:
        return self.entries[-1] if self.entries else None

    def _append(self, model_dir: str, config_model_dir: str) -> dict:
        entry = {"version": len(self.entries), "model_dir": model_dir, "config_model_dir": config_model_dir,
                 "time": round(time.time(), 3)}
        append_lines(self.path, [entry])
        self.refresh()
        return entry

    def start(self, config_model_dir: str) -> dict:
        """The version an app starting with `reward.model_dir = config_model_dir` scores with."""
        d = str(Path(config_model_dir).resolve())
        last = self.latest()
        if last is not None and last["config_model_dir"] == d:
            return last
        return self._append(d, d)

    def add(self, model_dir: str) -> dict:
        last = self.latest()
        if last is None:
            raise ConfigError("this reward app scores without a reward model (reward.model_dir is unset); "
                              "there is no model to replace")
        return self._append(check_model_dir(model_dir), last["config_model_dir"])
