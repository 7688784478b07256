"""The one place that decides device, dtype, collective backend and engine settings.

CPU boxes: gloo, vLLM's CPU build running in-process, DeepSpeed's CPU accelerator.
GPU clusters: NCCL, the CUDA vLLM build, one engine per GPU (or TP group), one learner rank per GPU.
Everything else asks a `DeviceProfile` instead of branching on `torch.cuda.is_available()`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from contract.dtype_choice import DtypeChoice

DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class DeviceProfile:
    kind: DeviceKind

    @property
    def collective_backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"

    def torch_device(self, local_index: int = 0) -> str:
        # Inside a Ray actor with num_gpus=1, the one visible GPU is always index 0.
        return f"cuda:{local_index}" if self.kind == "cuda" else "cpu"

    def actor_env(self, threads: int) -> dict[str, str]:
        """Environment every rollout/learner actor starts with (set before torch/vllm import)."""
        env = {"TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": str(max(1, threads)),
               "TOKENIZERS_PARALLELISM": "false", "VLLM_CONFIGURE_LOGGING": "0"}
        if self.kind == "cpu":
            # In-process engine: a vLLM subprocess per actor would fight for the same cores.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # vLLM's "auto" binding pins every engine's OpenMP threads to all cores and ignores
            # OMP_NUM_THREADS; and busy-waiting OpenMP threads collapse when cores are shared
            # (a 2-thread tiny engine under load: 6.5 s per batch spinning vs 0.54 s passive).
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env

    @property
    def weights_in_host_memory(self) -> bool:
        """Model weights, optimizer state and KV caches live in the host's RAM (cpu), not on a GPU."""
        return self.kind == "cpu"

    def vllm_engine_kwargs(self, kv_cache_bytes: int, gpu_memory_utilization: float) -> dict:
        if self.kind == "cpu":
            # No chunked prefill on CPU: when a step's prompt tokens exceed max_num_batched_tokens
            # (4096 for vllm.LLM on CPU) vLLM prefills one prompt partly, samples it anyway and rewinds
            # that request's torch.Generator with set_offset, which CPU generators lack: every seeded
            # batch over the budget died with "CPU Generator does not use offset". Unchunked, a prompt
            # is prefilled whole or waits for the next step (max_num_batched_tokens stays
            # >= max_model_len), so a seeded generator advances once per sampled token, whatever the
            # batch (docs/vllm_cpu_notes.md).
            return {"enforce_eager": True, "kv_cache_memory_bytes": kv_cache_bytes, "enable_chunked_prefill": False}
        return {"gpu_memory_utilization": gpu_memory_utilization}

    def reset_peak_memory(self) -> None:
        """Start a new window for `peak_memory_mb` (e.g. at the start of a train step)."""
        if self.kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        import gc

        gc.collect()
        _release_free_heap()  # so memory freed before the window does not count as resident in it
        try:  # Linux: "5" resets the process's resident high-water mark (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_memory_mb(self) -> float:
        """MiB at this process's peak since `reset_peak_memory`. cuda: torch.cuda.max_memory_allocated
        (tensors on the device). cpu: the resident set's high-water mark (VmHWM: weights, optimizer
        state, activations, and the interpreter and libraries too); where /proc has none, the
        lifetime peak (getrusage ru_maxrss), which no reset lowers."""
        if self.kind == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024

    def compute_dtype(self) -> str:
        """bfloat16 or float32: what `auto` means for rollout.engine.dtype and learner.dtype. cuda: bfloat16
        where the GPU has it; cpu: measured on this CPU, bfloat16 only when clearly faster
        (contract/dtype_choice.py)."""
        return self.dtype_choice().dtype

    def dtype_choice(self) -> "DtypeChoice":
        """`compute_dtype` with what decided it (timings, CPU model and flags); once per process."""
        return _dtype_choice(self.kind)

    def ray_resources(self, cpus: float, gpus: float) -> dict:
        """Ray actor options for one worker/rank; GPUs are only requested on a CUDA profile."""
        res: dict = {"num_cpus": cpus}
        if self.kind == "cuda":
            res["num_gpus"] = gpus
        return res


@functools.cache
def _dtype_choice(kind: str) -> "DtypeChoice":
    from contract import dtype_choice

    return dtype_choice.cuda_choice() if kind == "cuda" else dtype_choice.cpu_choice()


def _release_free_heap() -> None:
    """glibc keeps freed heap pages resident; malloc_trim hands them back (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_device(name: str = "auto") -> DeviceProfile:
    """`auto` picks CUDA when this process sees a GPU, else CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected one of auto|cpu|cuda (got {name!r})")
    if name == "auto":
        import torch

        name = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceProfile(kind=name)  # type: ignore[arg-type]
