"""DeepSpeed's JIT-compiled shared-memory op, which our ranks never use: never built, never loaded.

On CPU, `deepspeed.init_distributed` (its TorchBackend) loads `deepspeed_shm_comm`, compiling it
with g++ on first use (one to several minutes on 2 busy cores) in torch's extension directory under
a `lock` file. The op serves only `deepspeed.comm.inference_all_reduce`; training reduces through
torch.distributed (gloo/NCCL), so a learner or SFT rank has no use for it. What it cost us:
- a compile killed half way (a job stopped by its timeout) left the lock behind, and every later
  DeepSpeed init on the machine waited on it until `learner.init_timeout_s` (CI's first timeout);
- processes on one box rebuilt it in turn (torch's `.ninja_log` shows two command variants
  alternating), so a job start now and then spent 2+ minutes compiling: a learner group up in 177 s
  instead of 30 s, and an e2e test that timed out waiting for its first steps.

`skip_shm_op()`, called by a rank before its init, marks the op unavailable in DeepSpeed's table of
compatible ops, exactly as on a machine without a compiler: `build_shm_op` returns None and the
backend runs without it. Nothing is compiled, at install time or at run time.
"""
from __future__ import annotations

SHM_BUILDER = "ShareMemCommBuilder"


def skip_shm_op() -> None:
    """Mark DeepSpeed's shared-memory inference all-reduce op unavailable in this process."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is not None:  # None where the accelerator has no such op (CUDA: NCCL does it)
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
