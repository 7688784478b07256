"""The RESULTS page of benchmarks/real_model_paths.py, from its results dict (markdown, no figures by hand)."""
from __future__ import annotations

import json

RETRIED = " (the first try's embedded Ray missed Ray's 30 s raylet registration on the busy box; started again)"


def fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def report(r: dict) -> str:
    L = ["# The real model on every path: SmolLM2-135M-Instruct, small and once",
         "", f"Written by `{r['command']}` (never edited by hand).", "",
         f"- commit: {r['commit']}", f"- CPU: {r['cpu']}", f"- model: `{r['model']}`",
         f"- task: arithmetic (`rlhf make-task`, seed 1), {r['task_sizes']}", f"- total wall time: {r['wall_s']:.0f} s",
         f"- box load average at the start: {r['load']}", ""]
    s = r["sft"]
    L += ["## SFT (`rlhf train-sft`, 1 rank, float32)", ""]
    L += [f"FAILED: {s['error']}"] if not s["ok"] else [
        f"{s['num_train']} demonstrations (arithmetic train prompts + the answer as the reply), 1 epoch, "
        f"{s['steps']} steps of 16, lr 1e-4; held-out: {s['num_eval']} demonstrations from the held-out split"
        f"{RETRIED if s['ray_retried'] else ''}.", "",
        "| held-out loss before | after | train time (s) | whole command (s) |", "|---|---|---|---|",
        f"| {s['loss_before']:.4f} | {s['loss_after']:.4f} | {s['train_s']:.0f} | {s['process_s']:.0f} |"]
    m = r["rm"]
    L += ["", "## Reward model from the causal LM (`rlhf train-rm`, base_model = SmolLM2)", ""]
    L += [f"FAILED: {m['error']}"] if not m["ok"] else [
        f"{m['num_pairs']} pairs (arithmetic train prompts as conversations; chosen = the right answer, rejected = a "
        f"wrong number), 20% held out by train-rm, 1 epoch, batch 16, lr 1e-5.", "",
        f"train-rm said: `{m['said']}`", "",
        "| train-rm held-out accuracy | served: held-out-split pairs | untrained head, same pairs | job preflight "
        "problems | whole command (s) |", "|---|---|---|---|---|",
        f"| {m['accuracy']:.3f} | {m['served_accuracy']:.3f} ({m['num_served_pairs']} pairs) | "
        f"{m['untrained_accuracy']:.3f} | {len(m['preflight_problems'])} | {m['process_s']:.0f} |", "",
        "Served = the saved directory loaded by the reward service's `RewardModel` (conversations re-rendered in "
        "its chat template), scoring pairs made from the task's held-out split. Ranking the right answer above a wrong "
        "one needs the arithmetic itself: chance is 0.5."]
    j = r["lora"]
    L += ["", "## LoRA with adapter sync (`rlhf train`, GRPO, math verifier, `learner.lora.r=8`)", ""]
    if not j["ok"]:
        L += [f"FAILED: {j['error']}"]
    else:
        L += [f"2 steps of 2 prompts x 4 samples, 16 new tokens, lr 1e-3 (large on purpose: one update must be "
              f"visible), dynamic sampling (up to 6 draws) so a step trains on groups whose rewards differ. "
              f"{j['dtype_line']}. Whole command {j['process_s']:.0f} s{RETRIED if j['ray_retried'] else ''}.", "",
              "| step | reward mean | draws | uniform groups | trained samples | policy version | KL to base | "
              "logprob_gap | sync bytes | full weights bytes | ratio | sync s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, st in enumerate(j["steps"]):
            ratio = st["sync_bytes"] / j["full_bytes"] if st.get("sync_bytes") else None
            L.append(f"| {i} | {fmt(st['reward_mean'])} | {st['sampling_draws']} | {st['uniform_groups']} | "
                     f"{st['trained_samples']} | {st['policy_version']} | {fmt(st['kl'], '.2e')} | "
                     f"{fmt(st['logprob_gap'], '.2e')} | {st['sync_bytes']} | {j['full_bytes']} | "
                     f"{fmt(ratio, '.4f')} | {fmt(st['sync_s'])} |")
        L += ["", f"max |lora_B| in the final checkpoint's adapter: {fmt(j['adapter_max_abs_B'], '.2e')} (0 at the "
              f"start: > 0 means an update reached the adapter). KL to base is the learner's estimate on the step's "
              f"samples (step 1's > 0 when step 0 moved the adapter); logprob_gap is the mean |engine - learner| "
              f"token logprob, so a small gap at step 1 means the engine served the synced adapter."]
    v = r["review"]
    L += ["", "## The review page of that job (while it ran)", ""]
    if not v["ok"]:
        L += [f"FAILED: {v['error']}"]
    else:
        L += ["| check | result |", "|---|---|",
              f"| GET /reward/review with the token | {v['page_status']}, {v['page_type']}, html: {v['page_html']} |",
              f"| GET /reward/samples without the token | {v['no_token_status']} |",
              f"| GET /reward/samples with RUN/reward_store/token | {v['listed']} samples, newest step {v['step']} |",
              f"| listed samples of that step = its Parquet rows (prompt_id, sample_idx, response, reward) | "
              f"{v['match_parquet']} ({v['listed_this_step']} vs {v['parquet_rows']}) |",
              f"| reward parts listed | {', '.join(v['parts'])} |",
              f"| every sample has verifier:math; it equals the reward | {v['verifier_math_listed']}; "
              f"{v['verifier_math_equals_reward']} |",
              f"| GET /reward/curves rows | {v['curve_rows']} |", "",
              "One listed sample: `" + json.dumps(v["example"])[:600].replace("`", "'") + "`"]
    return "\n".join(L) + "\n"
