"""`RewardClient`: the training loop's way in (a Serve DeploymentHandle), with retries.

Large inputs go out as chunks of `max_batch_size` pairs, all in flight at once. A chunk whose
replica died or is restarting is re-sent with exponential backoff until `request_timeout_s` has
passed; results are placed by chunk position, so every input row appears exactly once, in order.
The client pickles as (name, cfg) only and re-opens its handles lazily, so a controller actor
can hold one.
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from contract.experience import REWARD_FIELDS
from reward_service.config import RewardConfig
from reward_service.feedback import validate_batch

REWARD_SCHEMA = pa.schema(REWARD_FIELDS)
RETRIABLE = (RayActorError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError)
ERRORS_KEY = b"reward_errors"


class RewardServiceError(RuntimeError):
    """The reward service could not score a request (bad input, or no answer before the deadline)."""


def reward_errors(table: pa.Table) -> list[str]:
    """Messages for the invalid rows of a `score` result (wrong-length or non-finite parts)."""
    import json

    meta = table.schema.metadata or {}
    return json.loads(meta.get(ERRORS_KEY, b"[]"))


def to_table(outs: list[dict]) -> pa.Table:
    """Chunk results -> one table in REWARD_FIELDS (parts as a map with the same keys per row, and
    the reward model version that scored each row)."""
    import json

    reward = np.concatenate([o["reward"] for o in outs]).astype(np.float32)
    valid = np.concatenate([o["valid"] for o in outs]).astype(bool)
    names = list(outs[0]["parts"])
    n, k = len(reward), len(names)
    items = (np.stack([np.concatenate([o["parts"][name] for o in outs]) for name in names], axis=1).ravel()
             if k else np.zeros(0))
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k, pa.int32())
    parts = pa.MapArray.from_arrays(offsets, pa.array(names * n, pa.string()), pa.array(items, pa.float64()))
    errors = [e for o in outs for e in o["errors"]]
    versions = pa.array(np.concatenate([o["rm_version"] for o in outs]).astype(np.int64))
    verifier = pa.array([o.get("verifier") for o in outs for _ in range(len(o["reward"]))], pa.string())
    outcome = pa.array([x for o in outs for x in (o.get("verifier_outcome") or [None] * len(o["reward"]))],
                       pa.string())
    table = pa.Table.from_arrays([pa.array(reward), pa.array(valid), parts, versions, verifier, outcome],
                                 schema=REWARD_SCHEMA)
    return table.replace_schema_metadata({ERRORS_KEY: json.dumps(errors).encode()})


class RewardClient:
    def __init__(self, name: str, cfg: RewardConfig, token_source: str = ""):
        self.name, self.cfg = name, cfg
        self.token_source = token_source  # where the app's token is: "$ENV_VAR" or a file path
        self._scorer = self._feedback = None
        self.retries = 0  # chunks re-sent after a replica died (for logs and tests)

    def __getstate__(self) -> dict:
        return {"name": self.name, "cfg": self.cfg.model_dump(), "token_source": self.token_source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], RewardConfig.model_validate(state["cfg"]), state.get("token_source", ""))

    @property
    def http_url(self) -> str:
        return f"http://{self.cfg.http_host}:{self.cfg.http_port}/{self.name}"

    @property
    def review_url(self) -> str:
        return f"{self.http_url}/review"

    def sign_in_hint(self) -> str:
        """How a person opens the review page (the token itself is never printed)."""
        show = (f"echo {self.token_source}" if self.token_source.startswith("$") else f"cat {self.token_source}")
        return f"open {self.review_url}?token=TOKEN once (TOKEN: `{show}`)"

    @property
    def scorer(self):
        if self._scorer is None:
            self._scorer = serve.get_deployment_handle("RewardScorer", app_name=self.name)
        return self._scorer

    @property
    def feedback(self):
        if self._feedback is None:
            self._feedback = serve.get_deployment_handle("RewardFeedback", app_name=self.name)
        return self._feedback

    def score(self, prompts: list[str], responses: list[str], messages: list[str | None] | None = None,
              references: list[str | None] | None = None) -> pa.Table:
        """One row per pair, in order: the REWARD_FIELDS (see `reward_errors` for invalid rows).
        `messages`: per pair the prompt's chat conversation as JSON (or None), which the reward model
        re-renders in its own chat template (reward_service/model.py). `references`: per pair the
        prompt's reference answer (or None), which the verifier checks the response against."""
        extra = {"messages": messages, "references": references}
        bad = {k: len(v) for k, v in extra.items() if v is not None and len(v) != len(prompts)}
        if len(prompts) != len(responses) or bad:
            raise RewardServiceError(f"score: {len(prompts)} prompts but {len(responses)} responses"
                                     + "".join(f" and {n} {k}" for k, n in bad.items()))
        if not prompts:
            return REWARD_SCHEMA.empty_table()
        b = self.cfg.max_batch_size
        sent = {k: v for k, v in extra.items() if v is not None and any(x is not None for x in v)}
        chunks = [{"prompts": list(prompts[i:i + b]), "responses": list(responses[i:i + b]),
                   **{k: list(v[i:i + b]) for k, v in sent.items()}} for i in range(0, len(prompts), b)]
        outs = self._call_all(lambda c: self.scorer.score.remote(**c), chunks)
        return to_table(outs)

    def add_feedback(self, records: list[dict]) -> int:
        """Validate then store human feedback records; returns how many were stored."""
        validate_batch(records)
        request_id = uuid.uuid4().hex  # the same id on every retry: a replayed batch is stored once
        return self._call_all(lambda recs: self.feedback.add.remote(recs, request_id), [records])[0]["stored"]

    def update_model(self, model_dir: str, timeout_s: float | None = None) -> dict:
        """Make `model_dir` the next reward model version and wait until every scorer replica scores
        with it (each loads it beside the old model and swaps between two forwards: nothing in flight
        fails or is sent twice). Returns {version, model_dir, replicas}."""
        from reward_service.versions import check_model_dir

        timeout_s = timeout_s or self.cfg.request_timeout_s
        entry = self.feedback.set_model.remote(check_model_dir(model_dir)).result(timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            acks = self.feedback.acks_for.remote(entry["version"]).result(timeout_s=timeout_s)
            bad = {r: e for r, e in acks.items() if e}
            if bad:
                replica, err = next(iter(bad.items()))
                raise RewardServiceError(f"reward model {model_dir}: replica {replica} could not load it ({err}); "
                                         f"it keeps scoring with the previous version")
            running = self._running_replicas()
            if running and len(acks) >= running:
                return {**entry, "replicas": sorted(acks)}
            if time.monotonic() > deadline:
                raise RewardServiceError(f"reward model {model_dir}: {len(acks)} of {running} replicas loaded it "
                                         f"within {timeout_s:.0f}s")
            time.sleep(0.2)

    def _running_replicas(self) -> int:
        app = serve.status().applications.get(self.name)
        dep = app.deployments.get("RewardScorer") if app else None
        return int(dep.replica_states.get("RUNNING", 0)) if dep else 0

    def summary(self) -> dict:
        """Rating counts, feedback records and the reward model version now current."""
        return self.feedback.summary.remote().result(timeout_s=self.cfg.request_timeout_s)

    def replica_stats(self, reset: bool = False) -> list[dict]:
        """Per-call stats of whichever scorer replicas answer (batch sizes seen by the model)."""
        return [self.scorer.stats.remote(reset).result(timeout_s=self.cfg.request_timeout_s)
                for _ in range(max(1, self.cfg.num_replicas) * 4)]

    def _call_all(self, send, items: list) -> list:
        """Send every item at once; re-send those whose replica died, until done or the deadline."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        pending = {i: send(x) for i, x in enumerate(items)}
        tries = dict.fromkeys(pending, 0)
        results: dict[int, object] = {}
        while pending:
            i, resp = next(iter(pending.items()))
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                results[i] = resp.result(timeout_s=left)
                del pending[i]
            except RETRIABLE as e:
                tries[i] += 1
                self.retries += 1
                if tries[i] > self.cfg.max_retries:
                    raise RewardServiceError(f"reward app {self.name!r}: gave up after {tries[i]} tries ({e})") from e
                time.sleep(min(0.25 * 2 ** (tries[i] - 1), 4.0, max(0.0, deadline - time.monotonic())))
                pending[i] = send(items[i])
            except TimeoutError:
                raise RewardServiceError(f"reward app {self.name!r}: no answer within "
                                         f"request_timeout_s={self.cfg.request_timeout_s}") from None
        return [results[i] for i in range(len(items))]
