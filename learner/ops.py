"""DeepSpeed's JIT-compiled op for CPU ranks, built once at install time, never inside a job.

On CPU, `deepspeed.init_distributed` loads `deepspeed_shm_comm` (its shared-memory intra-node
all-reduce), compiling it with g++ on first use (one to several minutes) in torch's extension
directory (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) under a `lock` file. A compile that is
killed half way (a job stopped by its timeout, Ctrl-C) leaves that lock behind, and every later
DeepSpeed init on the machine then waits on it forever. Hence:

    python -m learner.ops      # `make env` runs it: build now, in one process, clearing a stale lock

and `refuse_stale_lock()`, which a rank calls before its init: a lock older than STALE_LOCK_S is a
one-line error naming the file, not a silent wait until `learner.init_timeout_s`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_LOCK_S = 900.0  # seconds; a real compile takes 1-5 min on 2 busy cores


def shm_builder():
    """DeepSpeed's builder for the op, or None where the accelerator has none (CUDA uses NCCL)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_dir(name: str) -> Path:
    """torch's JIT build directory for extension `name` (where its `lock` lives)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def refuse_stale_lock(now: float | None = None) -> None:
    """Raise if the op's build lock is older than STALE_LOCK_S (a killed compile left it)."""
    builder = shm_builder()
    if builder is None:
        return
    lock = build_dir(builder.name) / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        raise RuntimeError(f"{lock}: a DeepSpeed op build lock {age / 60:.0f} min old (a compile was killed); "
                           f"remove it or run `python -m learner.ops` to rebuild")


def build(clear_lock: bool = True) -> Path | None:
    """Compile (or confirm built) the op; returns its build directory. Only for a moment when no job
    runs on this machine (install time): `clear_lock` removes any lock first."""
    builder = shm_builder()
    if builder is None:
        return None
    where = build_dir(builder.name)
    if clear_lock and (where / "lock").exists():
        os.remove(where / "lock")
    builder.load(verbose=False)
    return where


if __name__ == "__main__":
    t0 = time.perf_counter()
    done = build()
    print(f"learner.ops: {'nothing to build here' if done is None else f'deepspeed_shm_comm ready in {done}'} "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
