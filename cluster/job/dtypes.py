"""`auto` dtypes of a job resolved once, on the driver, before any service starts.

`rollout.engine.dtype: auto` and `learner.dtype: auto` mean the device profile's choice
(`DeviceProfile.compute_dtype`: measured on a CPU, capability on a GPU). It is made here, once,
so every engine and every learner rank get the same concrete dtype (a worker on another node
measuring for itself could disagree), and so the run's config.yaml and log show what ran.
"""
from __future__ import annotations

from cluster.config import JobConfig
from contract.devices import DeviceProfile


def resolve_job_dtypes(cfg: JobConfig, device: DeviceProfile) -> tuple[JobConfig, str]:
    """(the config with `auto` replaced by the device's choice, one line saying which dtypes run and
    why). A config with no `auto` comes back as it is (the same object)."""
    engine, learner = cfg.rollout.engine.dtype, cfg.learner.dtype
    if "auto" not in (engine, learner):
        return cfg, f"dtype: engine {engine}, learner {learner} (set in the config)"
    choice = device.dtype_choice()
    cfg = cfg.model_copy(deep=True)
    if engine == "auto":
        cfg.rollout.engine.dtype = choice.dtype
    if learner == "auto":
        cfg.learner.dtype = choice.dtype
    line = f"dtype: {choice.summary()}"
    if cfg.rollout.engine.dtype != cfg.learner.dtype:
        line += f"; engine {cfg.rollout.engine.dtype}, learner {cfg.learner.dtype}"
    return cfg, line
