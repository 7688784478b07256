"""benchmarks/gpu_check.py end to end with --tiny on CPU (what the lent GPU would run at full size):
the plain torch step, the learner's update with and without checkpointing and token budgets, and the
weight-packing line, each with a positive throughput and peak memory. Both optimizer paths: the
DeepSpeed one (LearnerRank ZeRO-0 and ZeRO-2 in the process, world size 1, gloo on CPU; about a minute
on 2 cores) and --torch-only (learner/local.py's LocalLearner: what the GPU box without deepspeed runs)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("flags, learner_rows", [([], 8), (["--torch-only"], 4)], ids=["deepspeed", "torch-only"])
def test_gpu_check_tiny_runs_end_to_end(tmp_path, flags, learner_rows):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--steps", "1", "--out", str(out),
                        *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if re.match(r"\| (plain|LearnerRank|LocalLearner)", line)]
    assert [r[0].strip() for r in rows][:1] == ["plain torch"] and len(rows) == 1 + learner_rows
    if not flags:
        assert "Optimizer: DeepSpeed (learner.rank.LearnerRank, AdamW)" in text, text
        assert [r[0].strip() for r in rows[1:]] == ["LearnerRank ZeRO-0"] * 4 + ["LearnerRank ZeRO-2"] * 4
    else:
        assert "deepspeed not used (--torch-only)" in text
        assert {r[0].strip() for r in rows[1:]} == {"LocalLearner (learner/update.py), torch AdamW"}
    assert {(r[1].strip(), r[2].strip()) for r in rows[1:]} == {
        (c, m) for c in ("on", "off") for m in ("fixed count", "token budget")}
    assert len({tuple(x.strip() for x in r[:3]) for r in rows[1:]}) == learner_rows  # each combination once per path
    for r in rows:
        step_s, tokens_s, peak = (float(x.replace(",", "")) for x in r[3:6])
        assert step_s > 0 and tokens_s > 0 and peak > 0, r
    assert re.search(r"= \d+\.\d+ GB/s\.$", text.strip())
