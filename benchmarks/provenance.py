"""Where a benchmark figure came from: the commit it ran on and the CPU it ran on (every RESULTS file
records both; boxes differ between sessions, e.g. in bf16 support)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = ROOT) -> str:
    """HEAD's short hash, with `+dirty` when tracked files other than the benchmarks' own RESULTS files (which
    a benchmark rewrites as it goes) differ from it; `unknown` outside a checkout."""
    try:
        run = dict(capture_output=True, text=True, cwd=root, timeout=30)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/RESULTS*"], **run).stdout.strip()
        return (head + ("+dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_line() -> str:
    """`model, N cores, flags: ...` (the vector extensions that decide bf16 and fp32 speed)."""
    flags = set()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"
