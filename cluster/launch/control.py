"""`rlhf scale` and `rlhf status`: talk to a running job's named controller actor from any process."""
from __future__ import annotations

import os

from cluster.errors import UsageError, one_line
from cluster.launch.ray_session import check_reachable


def _controller(address: str | None, name: str | None):
    import ray

    from cluster.job.controller import find_controller

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("no cluster address: pass --address HOST:PORT or set RAY_ADDRESS")
    if address != "auto" and not address.startswith(("ray://", "http://", "https://")):
        check_reachable(address)
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as e:
        raise UsageError(f"--address {address}: {one_line(e)}") from None
    try:
        return find_controller(name)
    except LookupError as e:
        raise UsageError(str(e)) from None


def scale_command(workers: int, address: str | None = None, name: str | None = None) -> int:
    import ray

    if workers < 1:
        raise UsageError(f"--workers: expected an integer >= 1 (got {workers})")
    ctl = _controller(address, name)
    try:
        r = ray.get(ctl.scale.remote(workers), timeout=60)
    except ray.exceptions.RayTaskError as e:
        raise UsageError(one_line(e.cause)) from None
    print(f"rlhf scale: requested {r['requested']} rollout worker(s) (now {r['num_workers']}); "
          f"applied before the next step")
    return 0


def stop_command(address: str | None = None, name: str | None = None) -> int:
    import ray

    r = ray.get(_controller(address, name).stop.remote(), timeout=60)
    print(f"rlhf stop: job {r['name']} stops after step {r['step']} with a checkpoint "
          f"(continue later with: rlhf train --resume {r['run_dir']})")
    return 0


def status_command(address: str | None = None, name: str | None = None) -> int:
    import ray

    st = ray.get(_controller(address, name).status.remote(), timeout=60)
    last = st["last"] or {}
    print(f"job {st['name']} ({st['mode']}): {st['phase']}, step {st['step']}/{st['steps']}, "
          f"policy version {st['policy_version']}")
    print(f"  rollout workers {st['num_workers']}: {', '.join(st['worker_ids'])}")
    print(f"  throughput {st['samples_per_s']:.1f} samples/s, {st['tokens_per_s']:.0f} rollout tokens/s; "
          f"reward {last.get('reward_mean', float('nan')):.3f}, kl {last.get('kl', float('nan')):.4f}")
    print(f"  run dir {st['run_dir']}; last checkpoint {st['latest_checkpoint']}")
    if st["error"]:
        print(f"  error: {st['error']}")
    return 0
