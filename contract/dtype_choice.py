"""The compute dtype a device should run at, decided by measurement on a CPU (capability on a GPU).

A hand-set dtype is wrong on one box or another: with AVX512-BF16 / AMX, bfloat16 generation and
training ran faster than float32 for a 110M model; on an AVX2-only AMD EPYC, bfloat16 took a slow
path and was ~5x slower (vLLM SmolLM2: fp32 141 tok/s, bf16 27 tok/s). So on a CPU we time the
work an LLM does most, a linear layer of LLM shape followed by a softmax, in float32 and bfloat16
on this process's threads, and take bfloat16 only when it is faster by a clear margin.

The measurement takes ~0.3 s on an idle 2-core box; it is cached per process (DeviceProfile) and kept in
`~/.cache/rlhf-actor-learner/dtype.json` keyed by CPU model + bf16-relevant flags + torch version,
so a box pays it once. Delete that file to measure again.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BF16_MARGIN = 1.2  # bf16 must be this many times faster than fp32: beyond timing noise, and worth its rounding
# The /proc/cpuinfo flags that decide bf16 speed (x86 `flags`, Arm `Features`), recorded with the figures.
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "bf16", "sve",
              "sve2", "i8mm")
PROBE_SHAPE = (256, 576, 1536)  # tokens x hidden -> intermediate: a SmolLM2-135M MLP projection of 256 tokens
PROBE_REPS = 5  # best of 5: a busy box's spikes rarely hit every round


@dataclass(frozen=True)
class DtypeChoice:
    """A device's compute dtype and what decided it."""
    dtype: str                    # "float32" | "bfloat16"
    how: str                      # "measured" | "cached" (a measurement of an earlier process) | "cuda"
    device: str                   # CPU or GPU model name
    flags: tuple[str, ...] = ()   # the BF16_FLAGS this CPU has
    torch: str = ""               # torch version the measurement ran on
    fp32_s: float | None = None   # seconds of one float32 probe (best of PROBE_REPS)
    bf16_s: float | None = None   # seconds of the same probe in bfloat16
    threads: int | None = None    # torch threads the probe ran on

    @property
    def bf16_speedup(self) -> float | None:
        """fp32 time / bf16 time: > 1 means bfloat16 is faster."""
        return self.fp32_s / self.bf16_s if self.fp32_s and self.bf16_s else None

    def flags_text(self) -> str:
        extra = [f for f in self.flags if f not in ("avx2", "asimd")]
        if extra:
            return "+".join(extra)
        return f"{self.flags[0]} only" if self.flags else "no vector flags read"

    def summary(self) -> str:
        """One line, e.g. `float32 (bf16 0.20x fp32 on AMD EPYC 7B13, avx2 only; measured)`."""
        if self.bf16_speedup is None:
            return f"{self.dtype} ({self.device}; {self.how})"
        return (f"{self.dtype} (bf16 {self.bf16_speedup:.2f}x fp32 on {self.device}, {self.flags_text()}; "
                f"{self.how})")


def choose_dtype(fp32_s: float, bf16_s: float, margin: float = BF16_MARGIN) -> str:
    """bfloat16 when it took at most 1/margin of float32's time, else float32."""
    if not (fp32_s > 0 and bf16_s > 0):
        raise ValueError(f"choose_dtype: timings must be positive (fp32 {fp32_s!r} s, bf16 {bf16_s!r} s)")
    return "bfloat16" if fp32_s / bf16_s >= margin else "float32"


def cpu_identity(cpuinfo: str) -> tuple[str, tuple[str, ...]]:
    """(model name, the BF16_FLAGS present) from /proc/cpuinfo's text (x86 or Arm)."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return (" ".join(model.split()) or platform.processor() or platform.machine() or "unknown CPU",
            tuple(f for f in BF16_FLAGS if f in flags))


def read_cpu_identity() -> tuple[str, tuple[str, ...]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_identity(f.read())
    except OSError:
        return cpu_identity("")


def cache_key(device: str, flags: tuple[str, ...], torch_version: str) -> str:
    return f"{device} | {' '.join(flags) or '-'} | torch {torch_version}"


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "rlhf-actor-learner" / "dtype.json"


def load_cached(path: Path, key: str) -> DtypeChoice | None:
    """The choice recorded under `key`, or None (no file, no entry, or an unreadable one)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))[key]
        return DtypeChoice(**{**entry, "flags": tuple(entry["flags"]), "how": "cached"})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cached(path: Path, key: str, choice: DtypeChoice) -> None:
    """Add `choice` under `key`, keeping the other boxes' entries; written atomically. A cache that
    cannot be written (read-only home) costs a measurement next time, nothing else."""
    from contract.atomic import write_atomically

    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    table[key] = asdict(choice)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass


def probe(dtype):
    """A callable running softmax(x @ w.T) at PROBE_SHAPE in `dtype`, on this process's torch threads."""
    import torch

    tokens, hidden, inter = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (torch.randn(inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    return lambda: torch.softmax(torch.nn.functional.linear(x, w), dim=-1)


def measure_cpu(margin: float = BF16_MARGIN, reps: int = PROBE_REPS) -> DtypeChoice:
    """Time the probe in float32 and bfloat16, alternating (so other load on the box hits both alike),
    best of `reps` each after a warm-up, and choose."""
    import torch

    device, flags = read_cpu_identity()
    runs = {"fp32": probe(torch.float32), "bf16": probe(torch.bfloat16)}
    best = {name: float("inf") for name in runs}
    for i in range(reps + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            if i:  # the first round warms up (thread pool, kernels, allocator)
                best[name] = min(best[name], time.perf_counter() - t0)
    return DtypeChoice(choose_dtype(best["fp32"], best["bf16"], margin), "measured", device, flags,
                       torch.__version__, best["fp32"], best["bf16"], torch.get_num_threads())


def cpu_choice(cache: Path | None = None) -> DtypeChoice:
    """This CPU's choice: from the cache file when this box (model, flags, torch) measured before,
    else measured now and recorded there."""
    import torch

    path = cache or default_cache_path()
    device, flags = read_cpu_identity()
    key = cache_key(device, flags, torch.__version__)
    found = load_cached(path, key)
    if found is not None:
        return found
    choice = measure_cpu()
    save_cached(path, key, choice)
    return choice


def cuda_choice() -> DtypeChoice:
    """bfloat16 when the GPU computes it natively (Ampere and later), else float32. A driver that sees
    no GPU (a CPU head node of a GPU cluster) assumes bfloat16, as every current training GPU has it."""
    import torch

    if not torch.cuda.is_available():
        return DtypeChoice("bfloat16", "assumed for cuda (no GPU visible to this process)", "GPU",
                           torch=torch.__version__)
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the keyword
        native = torch.cuda.is_bf16_supported()
    return DtypeChoice("bfloat16" if native else "float32", "cuda", torch.cuda.get_device_name(0),
                       torch=torch.__version__)
