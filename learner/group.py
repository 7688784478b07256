"""LearnerGroup: the controller-side handle on M learner ranks (Ray actors "learner-rank-{r}").

The ranks are started, rendezvoused and called as a `learner.rank_group.Ranks` (one placement group, DeepSpeed
initialised on all at once); every call waits with a timeout and watches all ranks together: a rank
that dies or raises becomes a RuntimeError that names the operation, never a hang on the survivors.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import ray

from contract.atomic import staged_dir
from contract.devices import DeviceProfile
from contract.weights import GroupAddress, WeightManifest
from learner.algorithm import Plan, make_plan
from learner.batch import prepare
from learner.config import LearnerConfig
from learner.rank import LearnerRank
from learner.rank_group import start_ranks


@ray.remote(num_cpus=0)
def _first_of(*results):
    """Resolves once every rank's part of a collective is done; the value is rank 0's."""
    return results[0]


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, policy_dir: str, device: DeviceProfile, critic_dir: str | None = None,
                 seed: int = 0, namespace: str | None = None, plan: Plan | None = None, max_staleness: int = 0):
        """`plan`: what an update needs of the job beyond `cfg` (the temperature the rollouts sample
        at, the loop's mode, the response limit), a job's from its plan (cluster/plan.py); None:
        `make_plan(cfg.rl)`, rollouts sampled at T = 1 by a sync loop. Sent as it is to every rank.
        `max_staleness`: the oldest policy lag (versions) a train step accepts (the job plan's)."""
        plan = plan or make_plan(cfg.rl)
        self.cfg, self.version, self.max_staleness = cfg, 0, max_staleness
        self.device_kind = device.kind
        self._namespace = namespace
        self._joined = False
        self._ranks = start_ranks(  # learner.resources: only nodes of the learner role (contract.placement)
            LearnerRank, lambda r: (r, cfg.model_dump_json(), policy_dir, critic_dir or cfg.critic_model, device.kind,
                                    seed, plan),
            cfg.num_ranks, device, cfg.cpus_per_rank, cfg.gpus_per_rank, cfg.resources, cfg.init_timeout_s,
            namespace, "learner-rank")
        try:
            self._manifest: WeightManifest = self._ranks.first(lambda r: r.manifest.remote(), cfg.init_timeout_s,
                                                               "manifest")
        except Exception:
            self.shutdown()
            raise

    def node_ids(self) -> list[str]:
        """Ray node ids the ranks' bundles are reserved on (rank order): where checkpoints are written."""
        return self._ranks.node_ids()

    # ---- training -------------------------------------------------------------------------------

    def train_step(self, experience: pa.Table) -> dict:
        """Validate, then one PPO-family update on every rank. Raises ExperienceError on a bad table."""
        p = self.cfg.rl
        prep = prepare(experience, self.version, self.max_staleness, multiple_of=p.minibatch_size)
        batch_ref = ray.put(prep.batch)
        metrics = self._ranks.all(lambda r: r.train_step.remote(batch_ref, prep.num_samples, self.version),
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
        return self._ranks.first(lambda r: r.endpoint.remote(False), self.cfg.init_timeout_s, "endpoint")

    def join_weight_group(self, addr: GroupAddress) -> ray.ObjectRef:
        """Rank 0 joins as group rank 0; the caller awaits this together with the workers' joins."""
        self._joined = True
        return self._ranks.handles[0].join_weight_group.remote(addr)

    def broadcast_weights(self) -> ray.ObjectRef:
        """All ranks gather, rank 0 sends; resolves to the version sent."""
        if not self._joined:
            raise RuntimeError("learner broadcast_weights: call join_weight_group first")
        return _first_of.remote(*[a.broadcast_weights.remote(self.version) for a in self._ranks.handles])

    def leave_weight_group(self) -> None:
        self._joined = False
        self._ranks.first(lambda r: r.leave_weight_group.remote(), self.cfg.sync_timeout_s, "leave_weight_group")

    def publish_object_store(self) -> tuple[int, ray.ObjectRef]:
        """(version, ref to the full HF-named state dict as a `PackedStateDict`), one ray.put on rank 0."""
        wrapped = self._ranks.all(lambda r: r.put_state_dict.remote(), self.cfg.sync_timeout_s,
                                  "publish_object_store")[0]
        return self.version, wrapped[0]

    # ---- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, path: str) -> None:
        """All engines' DeepSpeed state plus HF exports, written to a temp dir renamed into place
        (the path must be on storage every rank can reach)."""
        with staged_dir(path) as tmp:
            self._ranks.all(lambda r: r.save_checkpoint.remote(str(tmp), self.version), self.cfg.sync_timeout_s,
                            "save_checkpoint")

    def load_checkpoint(self, path: str) -> None:
        state = Path(path) / "learner_state.json"
        if not state.is_file():
            raise FileNotFoundError(f"learner checkpoint {path}: missing learner_state.json")
        versions = self._ranks.all(lambda r: r.load_checkpoint.remote(str(path)), self.cfg.sync_timeout_s,
                                   "load_checkpoint")
        self.version = versions[0]

    def shutdown(self) -> None:
        if getattr(self, "_ranks", None) is not None:
            self._ranks.kill()
