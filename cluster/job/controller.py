"""The named `controller` actor: owns the job's services and runs the loop in a thread.

Living in the cluster (not in the submitting process) is what lets `rlhf scale` and `rlhf status`
reach a running job from any other process: they look the actor up by name. The actor is threaded,
so `status()` and `scale()` answer while the loop thread is busy inside a step.
"""
from __future__ import annotations

import json
import threading
import time
import traceback

import ray

from cluster.config import JobConfig
from cluster.errors import JobFailed, one_line
from cluster.job.loop import LoopState, Services, TrainingLoop
from cluster.job.status import JobStatus, Phase
from cluster.outputs.run_dir import RunDir
from cluster.plan import JobPlan

CONTROLLER_NAME = "controller"


class Controller:
    def __init__(self, cfg: dict, plan: JobPlan, run_root: str, resume: bool):
        """`plan`: the job's plan as `rlhf train`'s preflight made it from `cfg` (cluster/plan.py)."""
        from cluster.job.gauges import RLGauges

        self.cfg, self.plan = JobConfig.model_validate(cfg), plan
        self.run = RunDir(run_root)
        self.resume = resume
        self.gauges = RLGauges(self.cfg.name)
        self.phase: Phase = "created"
        self.error: str | None = None
        self.services: Services | None = None
        self.loop: TrainingLoop | None = None
        self.first: dict | None = None
        self.last: dict = {}
        self.started = time.time()
        self._pending_workers: int | None = None
        self._stop_requested = False
        self._thread: threading.Thread | None = None
        self.messages: list[str] = []
        self.refresh = None  # reward.retrain_every (cluster/job/reward_refresh.py)

    # -- the remote API --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="loop", daemon=True)
        self._thread.start()

    def status(self, messages_from: int = 0) -> JobStatus:
        """Where the job stands, plus the controller's log lines from index `messages_from` on."""
        pool = self.services.pool if self.services else None
        reward = self.services.reward if self.services else None
        latest = self.run.latest_checkpoint()
        return JobStatus(
            name=self.cfg.name, phase=self.phase, error=self.error, run_dir=str(self.run.root),
            step=self.loop.state.step if self.loop else 0, steps=self.cfg.loop.steps, mode=self.cfg.loop.mode,
            policy_version=self.services.learner.version if self.services and self.services.learner else 0,
            num_workers=pool.num_workers if pool else 0, worker_ids=list(pool.worker_ids()) if pool else [],
            samples_per_s=self.last.get("samples", 0) / max(1e-9, self.last.get("wall_s", 0) or 1e-9),
            tokens_per_s=self.last.get("rollout_tokens_per_s", 0.0), first=self.first, last=self.last,
            latest_checkpoint=str(latest) if latest else None, uptime_s=time.time() - self.started,
            review_url=reward.review_url if reward else None, review_sign_in=reward.sign_in_hint() if reward else None,
            messages=self.messages[messages_from:], num_messages=len(self.messages))

    def scale(self, workers: int) -> dict:
        if workers < 1:
            raise ValueError(f"--workers: expected >= 1 (got {workers})")
        if self.phase in ("stopping", "done", "failed"):
            raise RuntimeError(f"job {self.cfg.name} is {self.phase}; nothing to scale")
        if self.loop is not None:
            self.loop.request_workers(workers)
        else:
            self._pending_workers = workers
        self._ask_autoscaler(workers)
        return {"requested": workers, "num_workers": self.services.pool.num_workers if self.services and self.services.pool
                else 0}

    def update_reward_model(self, model_dir: str) -> dict:
        """`rlhf reward-model update`: the running reward app scores with `model_dir` from now on (no
        restart; every sample's provenance names the version that scored it)."""
        if self.services is None or self.services.reward is None or self.phase in ("stopping", "done", "failed"):
            raise RuntimeError(f"job {self.cfg.name} is {self.phase}: no running reward service to update")
        entry = self.services.reward.update_model(model_dir)
        self._log(f"reward model v{entry['version']} <- {entry['model_dir']} (during step "
                  f"{self.loop.state.step if self.loop else 0})")
        return entry

    def stop(self) -> dict:
        """Finish the step in flight, checkpoint, and end the job as done (resumable)."""
        self._stop_requested = True
        if self.loop is not None:
            self.loop.stop.set()
        self._log("stop requested: finishing the current step, then checkpointing")
        return {"name": self.cfg.name, "step": self.loop.state.step if self.loop else 0,
                "run_dir": str(self.run.root)}

    # -- the loop thread -------------------------------------------------------------------------------
    def _main(self) -> None:
        from cluster.job.autoscale import release_rollout_capacity
        from cluster.job.reward_refresh import review_paths, reward_started
        from cluster.job.services import start_services, stop_services
        from cluster.job.storage_check import check_shared_run_dir, learner_node_candidates
        from cluster.outputs.report import write_report
        from contract.devices import resolve_device
        from contract.placement import bundle

        final = "failed"  # the phase the driver sees once everything is stopped
        try:
            self.phase = "starting"
            # Before the services start: their start runs in threads, and transformers' lazy imports
            # are not thread-safe (a tokenizer loaded here first resolves what the pool's needs too).
            prompts = self._read_prompts()
            device = resolve_device(self.cfg.device)
            # Learner ranks write checkpoints on their node: a run_dir it does not share is refused now,
            # on every node a rank may use, and below on the nodes the ranks got (job/storage_check.py).
            lc = self.cfg.learner
            shared = check_shared_run_dir(self.run.root, learner_node_candidates(
                bundle(device, lc.cpus_per_rank, lc.gpus_per_rank, lc.resources)), strict=False)
            self.services = start_services(self.cfg, device, str(self.run.root / "reward_store"), log=self._log,
                                           review=review_paths(self.run.root), plan=self.plan)
            self.refresh = reward_started(self.cfg, self.run.root, self.services.reward, self._log)
            check_shared_run_dir(self.run.root, [n for n in self.services.learner.node_ids() if n not in shared])
            state, in_flight = self._restore(prompts) if self.resume else (LoopState(), [])
            self.loop = TrainingLoop(self.cfg, self.run, self.services, prompts, state, on_step=self._on_step,
                                     log=self._log, in_flight=in_flight)
            if self._pending_workers is not None:
                self.loop.request_workers(self._pending_workers)
            if self._stop_requested:
                self.loop.stop.set()
            self.phase = "running"
            self.loop.run_loop()
            write_report(self.run)
            final = "done"
        except JobFailed as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the driver as one line
            print(traceback.format_exc(), flush=True)
            self.error = one_line(e)
        finally:
            # "done"/"failed" only once the services are stopped: the driver kills this actor when it
            # reads either, and a kill mid-stop left the reward app's detached Serve controller (and its
            # HTTP port) on a cluster the job had attached to.
            self.phase = "stopping"
            if self.services is not None:
                stop_services(self.services)
            release_rollout_capacity()
            self.run.close()
            if final == "failed" and self.error is None:
                self.error = "the job's loop ended without finishing"
            self.phase = final

    def _ask_autoscaler(self, workers: int) -> None:
        """`rlhf scale` past what the cluster holds: a standing autoscaler request (job/autoscale.py)."""
        from cluster.job.autoscale import request_rollout_capacity
        from contract.devices import resolve_device

        try:
            msg = request_rollout_capacity(self.cfg.rollout, resolve_device(self.cfg.device), workers)
        except Exception as e:  # noqa: BLE001 - the loop still grows the pool; the user learns why no node comes
            msg = f"rollout workers: could not ask the autoscaler for {workers} ({one_line(e)})"
        if msg:
            self._log(msg)

    def _read_prompts(self):
        from transformers import AutoTokenizer

        from contract.datasets import PromptIterator, load_prompts

        policy_tok = AutoTokenizer.from_pretrained(self.cfg.model.policy)  # renders chat prompts once
        return PromptIterator(load_prompts(self.cfg.data.prompts, self.cfg.data.columns, policy_tok),
                              seed=self.cfg.seed)

    def _restore(self, prompts) -> tuple[LoopState, list]:
        from cluster.job.resume import restore

        state, in_flight = restore(self.run, self.services, prompts, self._log)
        history = self.run.read_metrics()
        self.first = history[0] if history else None
        return state, in_flight

    def _on_step(self, step: int, m: dict) -> None:
        if self.first is None:
            self.first = m
        self.last = {**m, "step": step}
        self.gauges.update({**m, "step": step})
        if self.refresh is not None:
            self.refresh.after_step(step)

    def _log(self, msg: str) -> None:
        """To the actor's log (dashboard) and to the driver, which prints it above the progress bar."""
        print(f"[controller] {msg}", flush=True)
        self.messages.append(msg)


def controller_options(cfg: JobConfig, env: dict[str, str]) -> dict:
    """Named, threaded, zero-CPU, and pinned to this node (the run directory lives here)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return dict(name=CONTROLLER_NAME, namespace=cfg.ray.namespace, max_concurrency=8, num_cpus=0,
                max_restarts=0, runtime_env={"env_vars": env},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))


def find_controller(namespace: str | None = None):
    """The running job's controller: in `namespace`, else the only one on the cluster."""
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == CONTROLLER_NAME
             and (namespace is None or a["namespace"] == namespace)]
    if not found:
        where = f" in namespace {namespace!r}" if namespace else ""
        raise LookupError(f"no running rlhf job{where} on this cluster")
    if len(found) > 1:
        names = ", ".join(a["namespace"] for a in found)
        raise LookupError(f"several rlhf jobs are running (namespaces {names}); pick one with --name")
    return ray.get_actor(CONTROLLER_NAME, namespace=found[0]["namespace"])

