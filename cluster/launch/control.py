"""`rlhf scale`, `status`, `stop` and `reward-model update`: talk to a running job's named controller
actor from any process; `rlhf train-rm --from-run`: the next reward model from a run's ratings."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cluster.errors import UsageError, one_line
from cluster.launch.ray_session import check_reachable

_session: dict = {}  # what ray.init said about the cluster this process attached to


def dashboard_access(url: str | None) -> str:
    """How a person gets into the Ray dashboard at `url`: with token auth (Ray's default), the
    token it asks for is what `ray get-auth-token` prints (RAY_AUTH_TOKEN, else ~/.ray/auth_token)."""
    if not url:
        return "no dashboard on this cluster"
    url = url if url.startswith("http") else f"http://{url}"
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token_auth = is_token_auth_enabled()
    except Exception:  # noqa: BLE001 - another Ray version: go by the setting
        token_auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if not token_auth:
        return f"{url} (no token needed)"
    where = "$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else (
        os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token"))
    return f"{url} (its token prompt wants the output of `ray get-auth-token`, i.e. {where})"


def _controller(address: str | None, name: str | None):
    import ray

    from cluster.job.controller import find_controller

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("no cluster address: pass --address HOST:PORT or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):  # a dashboard address: ray.init checks it
        check_reachable(address)
    try:
        ctx = ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as e:
        raise UsageError(f"--address {address}: {one_line(e)}") from None
    _session["dashboard_url"] = getattr(ctx, "dashboard_url", None)
    try:
        return find_controller(name)
    except LookupError as e:
        raise UsageError(str(e)) from None


def _ask(ref, timeout_s: float = 60.0):
    """The controller's answer to one call; a refusal it raised (bad request) is a UsageError line,
    a controller that does not answer in `timeout_s` one too."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        raise UsageError(one_line(e.cause)) from None
    except ray.exceptions.GetTimeoutError:
        raise UsageError(f"the job's controller did not answer within {timeout_s:.0f}s") from None


def scale_command(workers: int, address: str | None = None, name: str | None = None) -> int:
    if workers < 1:
        raise UsageError(f"--workers: expected an integer >= 1 (got {workers})")
    r = _ask(_controller(address, name).scale.remote(workers))
    print(f"rlhf scale: requested {r['requested']} rollout worker(s) (now {r['num_workers']}); "
          f"applied before the next step")
    return 0


def stop_command(address: str | None = None, name: str | None = None) -> int:
    r = _ask(_controller(address, name).stop.remote())
    print(f"rlhf stop: job {r['name']} stops after step {r['step']} with a checkpoint "
          f"(continue later with: rlhf train --resume {r['run_dir']})")
    return 0


def status_command(address: str | None = None, name: str | None = None) -> int:
    st = _ask(_controller(address, name).status.remote())
    last = st.last or {}
    print(f"job {st.name} ({st.mode}): {st.phase}, step {st.step}/{st.steps}, policy version {st.policy_version}")
    print(f"  rollout workers {st.num_workers}: {', '.join(st.worker_ids)}")
    print(f"  throughput {st.samples_per_s:.1f} samples/s, {st.tokens_per_s:.0f} rollout tokens/s; "
          f"reward {last.get('reward_mean', float('nan')):.3f}, kl {last.get('kl', float('nan')):.4f}")
    print(f"  run dir {st.run_dir}; last checkpoint {st.latest_checkpoint}")
    if st.review_url:
        print(f"  review page {st.review_url}: {st.review_sign_in}")
    print(f"  Ray dashboard {dashboard_access(_session.get('dashboard_url'))}")
    if st.error:
        print(f"  error: {st.error}")
    return 0


def reward_model_update_command(target: list[str], address: str | None = None, name: str | None = None) -> int:
    """`rlhf reward-model update RUN_DIR NEW_DIR` (the cluster from RUN_DIR/cluster.json) or
    `rlhf reward-model update --address HOST:PORT NEW_DIR`."""
    if len(target) not in (1, 2):
        raise UsageError("expected RUN_DIR NEW_DIR, or NEW_DIR with --address HOST:PORT")
    model_dir = str(Path(target[-1]).expanduser().resolve())
    if len(target) == 2:
        info = Path(target[0]) / "cluster.json"
        if not info.is_file():
            raise UsageError(f"{target[0]}: no cluster.json (not a run directory, or its job never started its "
                             f"reward service); pass --address HOST:PORT instead")
        where = json.loads(info.read_text())
        address, name = address or where["address"], name or where["namespace"]
    entry = _ask(_controller(address, name).update_reward_model.remote(model_dir), timeout_s=900)
    print(f"rlhf reward-model: the job scores with reward model v{entry['version']} ({entry['model_dir']}) on "
          f"{len(entry['replicas'])} replica(s) from now on; no request was dropped or scored twice")
    return 0


def train_rm_from_run_command(run_dir: str, config: str | None, overrides: list[str]) -> int:
    """`rlhf train-rm --from-run RUN_DIR [CONFIG] [key=value ...]` (cluster/job/reward_refresh.py)."""
    from cluster.job.reward_refresh import train_next

    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    if not Path(run_dir).is_dir():
        raise UsageError(f"--from-run {run_dir}: not a directory")
    out = train_next(run_dir, config, overrides)
    extra = f" + {out['num_original']} original examples" if out["num_original"] else ""
    print(f"reward model saved to {out['output_dir']}: held-out accuracy {out['heldout_accuracy']:.3f} on "
          f"{out['num_heldout']} held-out ratings ({out['heldout_metric']}, {out['objective']}; trained on "
          f"{out['num_train_ratings']} ratings{extra})")
    print(f"  use it in the running job: rlhf reward-model update {run_dir} {out['output_dir']}")
    return 0
