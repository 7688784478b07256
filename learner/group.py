"""LearnerGroup: the controller-side handle on M learner ranks (Ray actors "learner-rank-{r}").

The group reserves a placement group (one bundle per rank), starts the ranks, lets rank 0 pick the
rendezvous address, and initialises DeepSpeed on all ranks at once. Every call waits with a
timeout and watches all ranks together: a rank that dies or raises becomes a RuntimeError that
names the operation, never a hang on the survivors.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from contract.atomic import staged_dir
from contract.devices import DeviceProfile
from contract.weights import GroupAddress, WeightManifest
from learner.algorithm import make_plan
from learner.batch import prepare
from learner.config import LearnerConfig
from learner.rank import LearnerRank


@ray.remote(num_cpus=0)
def _first_of(*results):
    """Resolves once every rank's part of a collective is done; the value is rank 0's."""
    return results[0]


DEATH_GRACE_S = 10.0  # how long a collective error may wait for the rank death that caused it


def wait_all(refs: list, timeout_s: float, what: str) -> list:
    """ray.get on every ref (refs[i] from rank i), failing fast on the first error instead of waiting
    on a blocked peer. A rank's death usually surfaces first as a broken collective on a surviving
    rank; the message names the dead rank when its death shows up within DEATH_GRACE_S."""
    rank_of = {ref: i for i, ref in enumerate(refs)}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"learner {what}: {len(pending)} rank(s) did not answer within {timeout_s:.0f}s")
        try:
            ray.get(ready[0], timeout=0)
        except RayActorError as e:
            raise _rank_died(what, rank_of[ready[0]], e) from e
        except RayTaskError as e:
            dead = _first_death(pending, rank_of)
            if dead is not None:
                raise _rank_died(what, *dead) from e
            raise RuntimeError(f"learner {what} failed on rank {rank_of[ready[0]]}: {type(e.cause).__name__}: "
                               f"{str(e.cause).splitlines()[0] if str(e.cause) else ''}") from e
    return ray.get(refs, timeout=0)


def _first_death(pending: list, rank_of: dict) -> tuple[int, RayActorError] | None:
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_GRACE_S) if pending else ([], [])
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except RayActorError as e:
            return rank_of[ref], e
        except Exception:  # noqa: BLE001 - another rank's collective error: not the cause
            continue
    return None


def _rank_died(what: str, rank: int, e: RayActorError) -> RuntimeError:
    return RuntimeError(f"learner {what}: learner rank {rank} died ({type(e).__name__})")


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, policy_dir: str, device: DeviceProfile, critic_dir: str | None = None,
                 seed: int = 0, namespace: str | None = None, sampling_temperature: float = 1.0,
                 async_rollouts: bool = False, max_new_tokens: int | None = None):
        """What the job knows about its rollouts and the learner config does not own:
        `sampling_temperature`: rollout.sampling.temperature; the learner scores
        log_softmax(logits / T) in every pass (T = 0, greedy, is scored at T = 1).
        `async_rollouts`: loop.mode == "async"; learner.rl.rollout_correction.mode null means tis
        then, off otherwise. `max_new_tokens`: rollout.sampling.max_new_tokens (the constant C of
        loss_aggregation seq_sum_norm unless loss_norm_tokens is set; L_max of overlong.mode penalty).
        See `learner.algorithm.make_plan`."""
        make_plan(cfg.rl, sampling_temperature, async_rollouts, max_new_tokens)  # fails here, before any actor
        self.cfg, self.version = cfg, 0
        self._namespace = namespace
        self._joined = False
        res = device.ray_resources(cfg.cpus_per_rank, cfg.gpus_per_rank)
        bundle = {"CPU": res["num_cpus"], **({"GPU": res["num_gpus"]} if "num_gpus" in res else {}),
                  **cfg.resources}  # learner.resources: only nodes of the learner role (contract.placement)
        self._pg = placement_group([bundle] * cfg.num_ranks, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=cfg.init_timeout_s)
        except GetTimeoutError as e:
            remove_placement_group(self._pg)
            raise RuntimeError(f"learner: {cfg.num_ranks} x {bundle} could not be reserved within "
                               f"{cfg.init_timeout_s:.0f}s") from e
        env = device.actor_env(max(1, int(cfg.cpus_per_rank)))
        rank_cls = ray.remote(LearnerRank)
        self._ranks = [
            rank_cls.options(name=f"learner-rank-{r}", namespace=namespace, max_restarts=0, **res,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, r),
                             runtime_env={"env_vars": env})
            .remote(r, cfg.model_dump_json(), policy_dir, critic_dir or cfg.critic_model, device.kind, seed,
                    sampling_temperature, async_rollouts, max_new_tokens)
            for r in range(cfg.num_ranks)]
        try:
            host, port = wait_all([self._ranks[0].endpoint.remote(cfg.num_ranks == 1)], cfg.init_timeout_s, "start")[0]
            self._all(lambda r: r.setup.remote(host, port), cfg.init_timeout_s, "DeepSpeed init")
            self._manifest: WeightManifest = wait_all([self._ranks[0].manifest.remote()], cfg.init_timeout_s,
                                                      "manifest")[0]
        except Exception:
            self.shutdown()
            raise

    def node_ids(self) -> list[str]:
        """Ray node ids the ranks' bundles are reserved on (rank order): where checkpoints are written."""
        from ray.util.placement_group import placement_group_table

        on = placement_group_table(self._pg)["bundles_to_node_id"]
        return [on[r] for r in range(self.cfg.num_ranks)]

    def _all(self, call, timeout_s: float, what: str) -> list:
        """`call(rank_handle)` -> ObjectRef on every rank at once (collective), awaited with `wait_all`."""
        return wait_all([call(a) for a in self._ranks], timeout_s, what)

    # ---- training -------------------------------------------------------------------------------

    def train_step(self, experience: pa.Table) -> dict:
        """Validate, then one PPO-family update on every rank. Raises ExperienceError on a bad table."""
        p = self.cfg.rl
        prep = prepare(experience, self.version, self.cfg.max_staleness, multiple_of=p.minibatch_size)
        batch_ref = ray.put(prep.batch)
        metrics = self._all(lambda r: r.train_step.remote(batch_ref, prep.num_samples, self.version),
                            self.cfg.step_timeout_s, "train_step")[0]
        self.version += 1
        return {**metrics, "policy_version": self.version, "num_samples": prep.num_samples,
                "num_truncated": int(prep.batch.truncated.sum()),
                "num_dropped": prep.num_dropped, "staleness": self.version - 1 - prep.min_policy_version}

    # ---- weight publishing ----------------------------------------------------------------------

    def weight_manifest(self) -> WeightManifest:
        return self._manifest

    def weight_group_endpoint(self) -> tuple[str, int]:
        """Where the weight-sync group meets: rank 0 hosts its store, so rank 0's node address and a
        port free there (the controller's node would be wrong on a multi-node cluster)."""
        return wait_all([self._ranks[0].endpoint.remote(False)], self.cfg.init_timeout_s, "endpoint")[0]

    def join_weight_group(self, addr: GroupAddress) -> ray.ObjectRef:
        """Rank 0 joins as group rank 0; the caller awaits this together with the workers' joins."""
        self._joined = True
        return self._ranks[0].join_weight_group.remote(addr)

    def broadcast_weights(self) -> ray.ObjectRef:
        """All ranks gather, rank 0 sends; resolves to the version sent."""
        if not self._joined:
            raise RuntimeError("learner broadcast_weights: call join_weight_group first")
        return _first_of.remote(*[a.broadcast_weights.remote(self.version) for a in self._ranks])

    def leave_weight_group(self) -> None:
        self._joined = False
        wait_all([self._ranks[0].leave_weight_group.remote()], self.cfg.sync_timeout_s, "leave_weight_group")

    def publish_object_store(self) -> tuple[int, ray.ObjectRef]:
        """(version, ref to the full HF-named state dict as a `PackedStateDict`), one ray.put on rank 0."""
        wrapped = self._all(lambda r: r.put_state_dict.remote(), self.cfg.sync_timeout_s, "publish_object_store")[0]
        return self.version, wrapped[0]

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, path: str) -> None:
        """All engines' DeepSpeed state plus HF exports, written to a temp dir renamed into place
        (the path must be on storage every rank can reach)."""
        with staged_dir(path) as tmp:
            self._all(lambda r: r.save_checkpoint.remote(str(tmp), self.version), self.cfg.sync_timeout_s,
                      "save_checkpoint")

    def load_checkpoint(self, path: str) -> None:
        state = Path(path) / "learner_state.json"
        if not state.is_file():
            raise FileNotFoundError(f"learner checkpoint {path}: missing learner_state.json")
        versions = self._all(lambda r: r.load_checkpoint.remote(str(path)), self.cfg.sync_timeout_s, "load_checkpoint")
        self.version = versions[0]

    def shutdown(self) -> None:
        for a in getattr(self, "_ranks", []):
            ray.kill(a, no_restart=True)
        self._ranks = []
        if getattr(self, "_pg", None) is not None:
            remove_placement_group(self._pg)
            self._pg = None
