"""Shared fixtures: tiny models built once per session, and one real local Ray cluster.

The Ray cluster is embedded (`address="local"`) so tests never attach to another cluster on the
box. Actor processes inherit the project through the editable install.
"""
from __future__ import annotations

import os
import sys
import time

import pytest

from support_tiers import TIER_TIMEOUT_S, TierTotals, tier_of

# Before anything imports torch/vllm in this process.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads the auth mode once per process (its cached RayConfig, filled when test modules import
# ray at collection), while the clusters it spawns read the environment. In-process CLI code
# (`cluster.cli.main`) sets RAY_AUTH_MODE=token when a token file exists, and a module-scoped
# fixture's change outlives `_restore_environ`: `ray_local` then started a token-auth GCS that this
# process, still 'disabled', could not talk to (InvalidAuthToken). Deciding before ray is imported,
# as the CLI does and as Ray defaults to for new local clusters, keeps the two in agreement.
os.environ.setdefault("RAY_AUTH_MODE", "token")


# Modules whose tests are independent whole-job scenarios (no module-scoped fixture): under
# pytest-xdist each of their tests is a unit of its own that may go to either worker. Every other
# module runs whole on one worker, so its module fixtures (a started job, a learner group,
# engines) start once and its tests keep their order.
SPREAD_MODULES = {"test_cluster_e2e.py", "test_learner.py"}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist must not refuse it
def pytest_xdist_make_scheduler(config, log):
    """`make test TEST_WORKERS=N` runs `-n N --dist loadscope`: one module per unit, SPREAD_MODULES'
    tests one each. (xdist's `loadgroup` would do it with markers, but under pytest 9 its group suffix
    is lost: it sets `item._nodeid`, and pytest keeps node ids in `_id`.)"""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep collection order (slow first), not most-tests-first

    class ModuleScopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module.rsplit("/", 1)[-1] in SPREAD_MODULES else module

    return ModuleScopes(config, log)


def pytest_collection_modifyitems(config, items):
    """Every test gets exactly one tier marker (unit / component / job, read from what it does:
    tests/support_tiers.py) and, unless it sets its own @pytest.mark.timeout (or the run gives
    --timeout / PYTEST_TIMEOUT), its tier's timeout. Then, in a pytest-xdist worker: modules with slow
    tests first, so the longest run while the short ones fill the other worker (xdist hands out units
    in collection order: longest-first scheduling). Whole modules move, each in its own order: some
    modules' tests build on their predecessors'."""
    explicit_timeout = config.getvalue("timeout") is not None or os.environ.get("PYTEST_TIMEOUT")
    for item in items:
        tier = tier_of(item)
        item.add_marker(tier)
        if not explicit_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUT_S[tier]))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow)  # stable


_TOTALS = TierTotals()
_STARTED = time.monotonic()


def pytest_runtest_logreport(report):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller sees every worker's reports
        _TOTALS.add(report)


def pytest_terminal_summary(terminalreporter):
    """One line per tier (tests, outcomes, summed seconds), also written to .pytest-tiers.json beside
    pyproject.toml with every test's seconds: where the README's figures come from."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not _TOTALS.tests:
        return
    from contract.atomic import write_atomically

    terminalreporter.section("per-tier totals")
    for line in _TOTALS.lines():
        terminalreporter.write_line(line)
    out = terminalreporter.config.rootpath / ".pytest-tiers.json"
    write_atomically(out, _TOTALS.to_json(time.monotonic() - _STARTED))
    terminalreporter.write_line(f"(per-test seconds: {out})")


@pytest.fixture(autouse=True)
def _restore_environ():
    """CLI code run in-process may set process-wide variables (e.g. RAY_AUTH_MODE=token before
    attaching to a cluster); one test's environment must not leak into the next test's Ray start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def serve_controller_pids():
    """A callable: the pids of the live Ray Serve controllers of this process's Ray, read when called."""
    from ray._private.state import actors as actor_table

    return lambda: [a["Pid"] for a in actor_table().values()
                    if a["ActorClassName"] == "ServeController" and a["State"] == "ALIVE"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from cluster.demo.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_chat_models(tmp_path_factory):
    """Qwen2-shaped ChatML policy and a Llama-3-template reward model with its own tokenizer."""
    from cluster.demo.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("chat_models"), size="tiny-chat")


def start_local_ray():
    """The tests' embedded local Ray cluster (logical CPUs overcommitted on 2 cores), started the way a
    job starts its own: tried again (3 tries) when a loaded box makes the raylet miss Ray's 30 s."""
    import ray

    from cluster.launch.ray_session import start_local

    if ray.is_initialized():
        return
    if start_local(3, num_cpus=8, include_dashboard=False, namespace="rlhf-tests", log_to_driver=False,
                   configure_logging=False) is None:
        raise RuntimeError("the tests' Ray did not start: its raylet missed Ray's 30 s to register 3 times")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the session."""
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """A `unit` test must not start Ray (an implicit `ray.init` by a `.remote()` call, say): that is a
    component test whose tier the source did not show. It fails here, naming the fix."""
    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    was_up = ray_up()
    yield
    if request.node.get_closest_marker("unit") is not None and not was_up and ray_up():
        sys.modules["ray"].shutdown()
        pytest.fail("a unit-tier test started Ray: use the ray_local fixture (tier component), or mark the "
                    "test @pytest.mark.component (tests/support_tiers.py)", pytrace=False)


def _serve_controller() -> str | None:
    """The id of the live Ray Serve controller of this process's Ray (None: no Serve, or no Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")._actor_id.hex()
    except ValueError:
        return None


@pytest.fixture(autouse=True)
def _no_serve_left_behind(request):
    """Serve's actors are detached: a Serve a test starts on the session's Ray and leaves running
    outlives it, and every later test sees it. Checked after each test on `ray_local` (a module
    fixture's Serve is up before its tests and stopped after them, so it is never counted), so the
    leak fails the test that made it, not the next one that looks."""
    if "ray_local" not in request.fixturenames:
        yield
        return
    before = _serve_controller()
    yield
    if before is not None:
        return  # a module fixture's Serve (a test may restart it: a new controller is not a leak)
    deadline = time.monotonic() + 30  # serve.shutdown returns before the controller is gone
    while (after := _serve_controller()) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    if after is not None:
        from ray import serve

        serve.shutdown()  # reported once, here; the tests after this one start clean
        pytest.fail(f"this test left a Ray Serve controller running on the session's Ray (actor {after})",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _ray_local_is_up(request):
    """A test module that drives another cluster from this process (test_cluster_multinode) shuts
    this process's Ray down. Without a restart, the next `.remote()` auto-started a default Ray with
    the box's 2 CPUs, where an engine + two ranks never got scheduled: those tests waited with no
    CPU in use until their timeouts (CI's failures of test_learner_sync and the review tests). That
    module restarts it itself; this is the backstop for tests after any other module that does the
    same (module-scoped fixtures are set up before it, so such a module must restart Ray itself)."""
    if "ray_local" in request.fixturenames:
        start_local_ray()
    yield
