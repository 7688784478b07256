"""Test tiers, decided from what a test does (not a test module; tests/conftest.py applies them).

- `job`: the test, one of its fixtures, or a helper of tests/ they call starts a whole job or a cluster
  of its own: `rlhf train` / `submit` / `train-sft` / `train-rm` / `generate` in a subprocess
  (`support_jobs.rlhf(CMD, ...)`, `start_train`, or a `[..., "cluster.cli", CMD, ...]` command line),
  a benchmark in a subprocess (`-m benchmarks.X`), an in-process training loop (`TrainingLoop`), a
  simulated multi-node cluster (`ray.cluster_utils.Cluster`) or a `ray start --head`.
- `component`: no whole job, but real Ray (the session's `ray_local`, or any fixture built on it),
  engines, learner groups or Serve: its fixtures include `ray_local`, or it, a fixture or a helper
  imports ray / vllm / deepspeed, or its module imports one of them at module level.
- `unit`: everything else. A unit test that starts Ray anyway fails (conftest checks after each one).

The reading is of the source (ast), through the fixtures the test uses and the module-level functions
of tests/ that they call by name, so a new test lands in its tier without a marker. A test may still
name its tier with `@pytest.mark.unit` / `component` / `job`; that wins.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "component", "job")
# Default per-test limits (setup + call + teardown, so a module fixture's start counts in its first
# test), about 2x the slowest test of the tier measured on the 2-core box; a test may set its own
# @pytest.mark.timeout. A hang costs this much, not the old flat 10 minutes.
TIER_TIMEOUT_S = {"unit": 120, "component": 300, "job": 600}

JOB_COMMANDS = {"train", "submit", "train-sft", "train-rm", "generate"}  # CLI commands that run a job
JOB_CALLS = {"start_train", "TrainingLoop", "Cluster"}  # callables that start a job or a cluster
HEAVY_IMPORTS = {"ray", "vllm", "deepspeed"}


@functools.cache
def _tree(fn) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _const(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _starts_a_job(call: ast.Call) -> bool:
    name = _name(call.func)
    if name in JOB_CALLS:
        return True
    return name == "rlhf" and bool(call.args) and _const(call.args[0]) in JOB_COMMANDS


def _is_job_command_line(seq: ast.List | ast.Tuple) -> bool:
    """[python, "-m", "cluster.cli", "train", ...], [python, "-m", "benchmarks.x", ...], [ray, "start", "--head"]."""
    items = [_const(e) for e in seq.elts]
    for i, s in enumerate(items):
        if s == "cluster.cli" and i + 1 < len(items) and items[i + 1] in JOB_COMMANDS:
            return True
        if s and s.startswith("benchmarks."):
            return True
    return "start" in items and "--head" in items


@functools.cache
def _facts(fn) -> tuple[frozenset, frozenset]:
    """(facts, names called) of one function's source: facts are 'job' and/or 'heavy' (imports ray & co)."""
    tree = _tree(fn)
    if tree is None:
        return frozenset(), frozenset()
    facts, called = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if _starts_a_job(node):
                facts.add("job")
            if (name := _name(node.func)) is not None:
                called.add(name)
        elif isinstance(node, (ast.List, ast.Tuple)) and _is_job_command_line(node):
            facts.add("job")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY_IMPORTS for a in node.names):
            facts.add("heavy")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in HEAVY_IMPORTS:
            facts.add("heavy")
    return frozenset(facts), frozenset(called)


def _in_tests(fn) -> bool:
    try:
        return Path(inspect.getsourcefile(fn)).resolve().is_relative_to(TESTS)
    except TypeError:
        return False


def _reach(fn, seen: set) -> set:
    """Facts of `fn` and of the module-level functions of tests/ it calls by name, transitively."""
    fn = inspect.unwrap(fn)
    if fn in seen or not inspect.isfunction(fn) or not _in_tests(fn):
        return set()
    seen.add(fn)
    facts, called = _facts(fn)
    out = set(facts)
    for name in called:
        target = fn.__globals__.get(name)
        if inspect.isfunction(target):
            out |= _reach(target, seen)
    return out


def _module_imports_heavy(module) -> bool:
    return any(inspect.ismodule(v) and v.__name__.split(".")[0] in HEAVY_IMPORTS for v in vars(module).values())


def tier_of(item) -> str:
    """The tier of a collected pytest item (see the module docstring)."""
    for tier in TIERS:
        if item.get_closest_marker(tier) is not None:
            return tier
    fns = [item.function] if hasattr(item, "function") else []
    try:  # autouse fixtures (conftest's environment and Ray guards) say nothing of the test itself
        autouse = set(item.session._fixturemanager._getautousenames(item))
    except AttributeError:
        autouse = set()
    for name in item.fixturenames:
        if name in autouse:
            continue
        for fixdef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            fns.append(fixdef.func)
    seen, facts = set(), set()
    for fn in fns:
        facts |= _reach(fn, seen)
    if "job" in facts:
        return "job"
    if "ray_local" in item.fixturenames or "heavy" in facts:
        return "component"
    module = getattr(item, "module", None)
    if module is not None and _module_imports_heavy(module):
        return "component"
    return "unit"


class TierTotals:
    """Per-test seconds (setup + call + teardown) and outcome, gathered from the run's reports (the
    controller's, under pytest-xdist), summed per tier for the terminal and `.pytest-tiers.json`."""

    def __init__(self):
        self.tests: dict[str, dict] = {}

    def add(self, report) -> None:
        tier = next((t for t in TIERS if t in report.keywords), "unit")
        test = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "tier": tier, "seconds": 0.0,
                                                     "outcome": "passed"})
        test["seconds"] += report.duration
        if report.failed:
            test["outcome"] = "failed"  # in setup, call or teardown
        elif report.skipped and test["outcome"] == "passed":
            test["outcome"] = "skipped"

    def totals(self) -> dict[str, dict]:
        out = {}
        for tier in TIERS:
            rows = [t for t in self.tests.values() if t["tier"] == tier]
            out[tier] = {"tests": len(rows), "seconds": round(sum(t["seconds"] for t in rows), 1),
                         **{k: sum(t["outcome"] == k for t in rows) for k in ("passed", "failed", "skipped")}}
        return out

    def lines(self) -> list[str]:
        return [f"{tier}: {t['tests']} tests, {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
                f"{t['seconds']:.0f} s ({t['seconds'] / 60:.1f} min)" for tier, t in self.totals().items()]

    def to_json(self, wall_s: float) -> str:
        import json

        tests = sorted(self.tests.values(), key=lambda t: -t["seconds"])
        return json.dumps({"wall_s": round(wall_s, 1), "tiers": self.totals(),
                           "tests": [{**t, "seconds": round(t["seconds"], 2)} for t in tests]}, indent=1) + "\n"
