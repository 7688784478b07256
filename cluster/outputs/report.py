"""The end-of-run report: one PNG of the curves that tell whether training worked and where time went."""
from __future__ import annotations

from contract.atomic import staged_file

from cluster.outputs.run_dir import RunDir

PANELS = [
    ("training reward (reward model, functions and verifier, as combined)", ["reward_mean"]),
    ("gold score (when the task has one)", ["gold_mean"]),
    ("KL to reference", ["kl"]),
    ("losses", ["policy_loss", "value_loss"]),
    ("rollout tokens/s", ["rollout_tokens_per_s"]),
    ("seconds per step (weight sync = sync_s)", ["gen_s", "reward_s", "train_s", "sync_s"]),
]


def reward_model_switches(rows: list[dict]) -> list[tuple[int, int]]:
    """(step, version) of each step that first scored with a new reward model version."""
    out, last = [], None
    for r in rows:
        v = r.get("reward_model_version")
        if v is not None and last is not None and v != last:
            out.append((r["step"], v))
        last = v if v is not None else last
    return out


def write_report(run: RunDir) -> str | None:
    rows = run.read_metrics()
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    steps = [r["step"] for r in rows]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            if any(k in r for r in rows):
                ax.plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
        for step, version in reward_model_switches(rows) if keys == ["reward_mean"] else []:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)  # `rlhf reward-model update`
            ax.annotate(f"RM v{version}", (step, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        ha="left", va="top", color="grey")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run.root / "report.png"
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return str(path)
