"""The RESULTS file, its JSON and its PNG for benchmarks/real_learning.py (written by the script only)."""
from __future__ import annotations

import json
from pathlib import Path

TARGETS = {"gain": 0.20, "time_ratio": 0.7, "generation_ratio": 0.95, "learner_ratio": 0.9}


def _time_to_reach(rows: list[dict], system: str, level: float, key: str = "greedy") -> float | None:
    """Training wall time of the first checkpoint of `system` at or above `level`."""
    for r in sorted((r for r in rows if r["system"] == system), key=lambda r: r["step"]):
        if r[key] >= level - 1e-9 and r["wall_s"] is not None:
            return r["wall_s"]
    return None


def start_row(rows: list[dict]) -> dict:
    """The model RL started from: the SFT warm-up when there was one, else the pretrained model."""
    return next((r for r in rows if r["system"] == "sft"), None) or next(r for r in rows if r["system"] == "base")


def verdicts(res: dict) -> list[str]:
    rows = res["rows"]
    base, start = next(r for r in rows if r["system"] == "base"), start_row(rows)
    sft_s = (res.get("sft") or {}).get("wall_s", 0.0)
    out = []
    ours = [r for r in rows if r["system"] == "ours"]
    best = max(ours, key=lambda r: r["sampled"]) if ours else None
    if best:
        for key in ("greedy", "sampled"):
            gain = best[key] - base[key]
            ok = "met" if gain >= TARGETS["gain"] else "NOT met"
            warm = f" (SFT warm-up {sft_s / 60:.1f} + RL {best['wall_s'] / 60:.1f})" if start is not base else ""
            out.append(f"held-out {key} accuracy {base[key]:.3f} -> {best[key]:.3f} (+{100 * gain:.1f} points) "
                       f"in {(sft_s + best['wall_s']) / 60:.1f} min of training{warm}: target +20 points within "
                       f"60 min {ok}")
            if start is not base:
                out.append(f"RL alone: {start[key]:.3f} after the SFT warm-up -> {best[key]:.3f} "
                           f"({100 * (best[key] - start[key]):+.1f} points)")
    trl = [r for r in rows if r["system"] == "trl"]
    if trl and ours:
        final = max(trl, key=lambda r: r["step"])
        for key in ("greedy", "sampled"):
            t_ours = _time_to_reach(rows, "ours", final[key], key)
            t_trl = _time_to_reach(rows, "trl", final[key], key)
            if t_ours is None:
                out.append(f"{key}: ours never reached TRL's final {final[key]:.3f} (target <= 0.7x TRL's time NOT met)")
            elif t_trl:
                ratio = t_ours / t_trl
                out.append(f"{key}: ours reached TRL's final {final[key]:.3f} at {t_ours / 60:.1f} min vs TRL "
                           f"{t_trl / 60:.1f} min: {ratio:.2f}x (target <= 0.7x "
                           f"{'met' if ratio <= TARGETS['time_ratio'] else 'NOT met'})")
    f = res.get("floors") or {}
    if "generation_ratio" in f:
        out.append(f"generation {f['ours_rollout_tokens_per_s']:.1f} tok/s vs bare vLLM {f['bare_vllm_tokens_per_s']:.1f}"
                   f": {f['generation_ratio']:.2f}x (target >= 0.95x "
                   f"{'met' if f['generation_ratio'] >= TARGETS['generation_ratio'] else 'NOT met'})")
    if f.get("learner_ratio"):
        out.append(f"learner step {f['ours_train_s']:.1f} s vs plain torch {f['plain_torch_train_s']:.1f} s: tokens/s "
                   f"{f['learner_ratio']:.2f}x (target >= 0.9x "
                   f"{'met' if f['learner_ratio'] >= TARGETS['learner_ratio'] else 'NOT met'})")
    return out


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    base = start_row(res["rows"])
    for system, colour in (("ours", "tab:blue"), ("trl", "tab:orange")):
        rows = sorted((r for r in res["rows"] if r["system"] == system), key=lambda r: r["step"])
        if not rows:
            continue
        t = [0.0] + [r["wall_s"] / 60 for r in rows]
        for key, style in (("greedy", "-o"), ("sampled", "--s")):
            axes[0].plot(t, [base[key]] + [r[key] for r in rows], style, color=colour, label=f"{system} {key}")
        steps = [s["step"] for s in res[system]["steps"]]
        axes[1].plot(steps, [s["reward_mean"] for s in res[system]["steps"]], color=colour, label=f"{system} train reward")
    axes[0].set(xlabel="RL training wall time (min)", ylabel="held-out accuracy", title=f"{res['task']}: held-out")
    axes[1].set(xlabel="step", ylabel="mean verifier reward (train samples)", title="training reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def write_report(res: dict, out: Path) -> None:
    png, js = out.with_suffix(".png"), out.with_suffix(".json")
    js.write_text(json.dumps(res, indent=1, default=str))
    plot(res, png)
    a = res["args"]
    lines = [f"# A real model on a real task: SmolLM2-135M-Instruct, {res['task']}, ours vs TRL", "",
             f"Command: `{res['command']}` (commit {res['commit']}, {res['bench_s'] / 60:.0f} min in all)  ",
             *([f"Training by an earlier run of this script in the same work dir: `{res['trained_by']}`  "]
               if res.get("trained_by", res["command"]) != res["command"] else []),
             f"CPU: {res['cpu']}  ", f"dtype: {res['dtype']}  ",
             f"Box load (mean 1-min load average per phase; 2 = both cores busy): "
             f"{', '.join(f'{k} {v}' for k, v in res.get('load', {}).items())}  ",
             f"Budget: {a['steps']} steps, a checkpoint every {a['save_every']}; held-out: {a['heldout']} prompts, "
             f"greedy pass@1 and the mean accuracy of {a['k']} samples at T=1 (the task's verifier), "
             f"<= {a['max_new_tokens']} new tokens; learning rate {a['lr']}.", "",
             *([f"SFT warm-up before RL (both systems start from it): {res['sft']['examples']} solved train "
                f"problems, {res['sft']['epochs']} epochs, lr {res['sft']['lr']}, "
                f"{res['sft']['wall_s'] / 60:.1f} min: `{res['sft']['summary']}`", ""] if res.get("sft") else []),
             "## Verdicts", "", *[f"- {v}" for v in verdicts(res)], "",
             "## Held-out accuracy by checkpoint", "",
             "| system | step | RL training wall (min) | greedy pass@1 | mean@k T=1 | mean response tokens (greedy) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        wall = "-" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f}"
        lines.append(f"| {r['system']} | {r['step']} | {wall} | {r['greedy']:.3f} | {r['sampled']:.3f} | "
                     f"{r['greedy_response_tokens']:.1f} |")
    lines += ["", "## Training steps", "", "| system | step | wall (min) | train reward | kl |", "|---|---|---|---|---|"]
    for system in ("ours", "trl"):
        for s in (res.get(system) or {}).get("steps", []):
            kl = "-" if s.get("kl") is None else f"{s['kl']:.4f}"
            reward = "-" if s.get("reward_mean") is None else f"{s['reward_mean']:.3f}"
            lines.append(f"| {system} | {s['step']} | {s['wall_s'] / 60:.1f} | {reward} | {kl} |")
    lines += ["", f"![held-out accuracy]({png.name})", "",
              "Examples (greedy, last checkpoint of each system):", ""]
    for system in ("base", "sft", "ours", "trl"):
        rows = [r for r in res["rows"] if r["system"] == system]
        if rows:
            ex = max(rows, key=lambda r: r["step"])["greedy_examples"]
            lines.append(f"- {system}: " + " | ".join(repr(e[:80]) for e in ex))
    out.write_text("\n".join(lines) + "\n")
