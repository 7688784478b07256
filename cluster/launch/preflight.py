"""What `rlhf train` checks before anything starts, so a job never fails minutes in on a mistake
that could be seen in seconds. Every problem is one line naming the key; all are listed at once
(one `ConfigError`).

- model directories: present, and of the right kind (config.json `architectures`: a causal LM as
  `model.policy`, a one-output sequence classifier as `reward.model_dir`), with enough positions
  for `rollout.engine.max_model_len` / `reward.max_length`;
- prompt files readable, and their longest prompt + `max_new_tokens` within `max_model_len`;
- `reward.functions` and `loop.gold_function` importable;
- resources: what the job asks (CPUs, GPUs, custom resources per role) against what the cluster
  has (`ray.cluster_resources()` once attached) or what an embedded cluster will get, and for an
  embedded cluster the host memory its processes need at least (memory_estimate.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from contract.config_base import ConfigError

if TYPE_CHECKING:
    from cluster.plan import JobPlan

CAUSAL_LM = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
LONGEST_CHECKED = 1000  # prompts tokenized for the length check: the longest by characters


def _hf_config(key: str, d: str, problems: list[str]) -> dict | None:
    p = Path(d)
    if not (p / "config.json").is_file():
        why = "does not exist" if not p.exists() else "has no config.json"
        problems.append(f"{key}: model directory {d} {why}; expected a Hugging Face model directory")
        return None
    try:
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        problems.append(f"{key}: {p / 'config.json'} is not valid JSON")
        return None


def _positions(hf: dict) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(hf.get(k), int):
            return hf[k]
    return None


def check_reward_model(key: str, d: str, problems: list[str],
                       kind: str = "a reward model (*ForSequenceClassification with one output; `rlhf train-rm` "
                                   "makes one)") -> dict | None:
    """A sequence classifier with exactly one output; returns its config.json."""
    rm = _hf_config(key, d, problems)
    if rm is not None:
        archs = rm.get("architectures") or []
        labels = len(rm["id2label"]) if isinstance(rm.get("id2label"), dict) else rm.get("num_labels")
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            problems.append(f"{key}: {d} is a {archs[0]}, not {kind}")
        elif labels not in (None, 1):
            problems.append(f"{key}: {d} has {labels} outputs (id2label); a reward model has exactly one "
                            f"(num_labels=1)")
    return rm


def check_train_rm(cfg) -> None:
    """`rlhf train-rm`: the base model is a one-output sequence classifier, or a causal LM of a family
    transformers has a sequence-classification class for (train-rm puts a new one-output head on its
    body); anything else would fail deep in transformers."""
    problems: list[str] = []
    hf = _hf_config("base_model", cfg.base_model, problems)
    archs = (hf or {}).get("architectures") or []
    if hf is not None and any(a.endswith(CAUSAL_LM) for a in archs):
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        if hf.get("model_type") not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            problems.append(f"base_model: {cfg.base_model} is a {archs[0]} (model_type {hf.get('model_type')}), a "
                            f"family with no sequence-classification head in transformers; start from a "
                            f"*ForSequenceClassification model with one output")
    elif hf is not None:
        check_reward_model("base_model", cfg.base_model, problems,
                           "a sequence classifier with one output (*ForSequenceClassification, num_labels=1) or a "
                           "causal LM (*ForCausalLM), what train-rm starts from")
    if problems:
        raise ConfigError(*problems)


def check_models(cfg, plan, problems: list[str]) -> dict | None:
    """Model directories and their kinds; returns the policy's config.json (None if unusable)."""
    policy = _hf_config("model.policy", cfg.model.policy, problems)
    if policy is not None:
        archs = policy.get("architectures") or []
        if archs and not any(a.endswith(CAUSAL_LM) for a in archs):
            problems.append(f"model.policy: {cfg.model.policy} is a {archs[0]}, not a causal LM (*ForCausalLM); "
                            f"a reward model belongs in reward.model_dir")
        pos = _positions(policy)
        if pos and cfg.rollout.engine.max_model_len > pos:
            problems.append(f"rollout.engine.max_model_len: {cfg.rollout.engine.max_model_len} exceeds the "
                            f"{pos} positions of model.policy (config.json max_position_embeddings)")
    if cfg.reward.model_dir:
        rm = check_reward_model("reward.model_dir", cfg.reward.model_dir, problems)
        pos = _positions(rm) if rm is not None else None
        if pos and cfg.reward.max_length > pos:
            problems.append(f"reward.max_length: {cfg.reward.max_length} exceeds the {pos} positions of "
                            f"reward.model_dir (config.json max_position_embeddings)")
    if cfg.learner.critic_model:
        _hf_config("learner.critic_model", cfg.learner.critic_model, problems)
    if plan is not None and plan.rollout.engine.lora_rank:  # an adapter sync: vLLM must serve an adapter of it
        from actors.adapter import lora_engine_kwargs

        try:
            lora_engine_kwargs(plan.rollout.engine.lora_rank)
        except ValueError as e:
            problems.append(f"learner.lora.r: {cfg.learner.lora.r} is too large for an adapter sync "
                            f"({str(e).split(': ', 1)[1]})")
    return policy


def check_prompts(cfg, policy_ok: bool, problems: list[str]) -> None:
    """Prompt files load (chat `messages` render with the policy's chat template); the longest prompt
    leaves room for a whole response in max_model_len."""
    from contract.chat import encode_prompts
    from contract.datasets import DEFAULT_COLUMNS, DatasetError, load_prompts, require_answers

    tok = None
    if policy_ok:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(cfg.model.policy)
        except Exception as e:  # noqa: BLE001 - any loader failure is the same user-facing problem
            problems.append(f"model.policy: cannot load its tokenizer ({str(e).splitlines()[0][:200]})")
    sets = [("data.prompts", cfg.data.prompts, cfg.data.columns, cfg.rollout.sampling.max_new_tokens)]
    ev = getattr(cfg, "eval", None)
    if ev is not None and getattr(ev, "prompts", None):
        sets.append(("eval.prompts", ev.prompts, getattr(ev, "columns", None), getattr(ev, "max_new_tokens", None)
                     or cfg.rollout.sampling.max_new_tokens))
    tables = []
    for key, path, columns, new_tokens in sets:
        try:
            table = load_prompts(path, columns, tok)
            if cfg.reward.verifier is not None:
                require_answers(table, path, (columns or DEFAULT_COLUMNS).answer)
            tables.append((key, table, new_tokens))
        except DatasetError as e:
            problems.append(f"{key}: {e}")
    if tok is None or not tables:
        return
    limit = cfg.rollout.engine.max_model_len
    for key, table, new_tokens in tables:
        rows = sorted(zip(table.column("prompt").to_pylist(), table.column("messages").to_pylist()),
                      key=lambda r: len(r[0]), reverse=True)[:LONGEST_CHECKED]
        longest = max(len(ids) for ids in encode_prompts(tok, [t for t, _ in rows], [m for _, m in rows]))
        if longest + new_tokens > limit:
            problems.append(f"rollout.engine.max_model_len: {limit} is too short for {key}: its longest prompt has "
                            f"{longest} tokens, + {new_tokens} new tokens = {longest + new_tokens}; raise it or "
                            f"lower max_new_tokens (responses would be cut short silently)")


def check_functions(cfg, problems: list[str]) -> None:
    """Reward functions (with reward.python_path) and the gold function import and are callable."""
    from contract.user_code import load_function

    added = [p for p in cfg.reward.python_path if p not in sys.path]
    sys.path[:0] = added
    try:
        for i, f in enumerate(cfg.reward.functions):
            try:
                load_function(f.path, f"reward.functions[{i}].path")
            except ValueError as e:
                problems.append(str(e))
    finally:
        for p in added:
            sys.path.remove(p)
    if cfg.loop.gold_function:
        try:
            load_function(cfg.loop.gold_function, "loop.gold_function")
        except ValueError as e:
            problems.append(str(e))


def demand(cfg, plan, device) -> list[tuple[str, int, dict[str, float]]]:
    """(count key, count, one unit's bundle) per role: what the job reserves from Ray."""
    gpus = device.kind == "cuda"

    def unit(cpus: float, gpu: float, section) -> dict[str, float]:
        b = {"CPU": cpus, **({"GPU": gpu} if gpus and gpu else {})}
        return {**b, **(getattr(section, "resources", None) or {})}

    return [("learner.num_ranks", cfg.learner.num_ranks,
             unit(cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank, cfg.learner)),
            ("rollout.num_workers", cfg.rollout.num_workers,
             unit(cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker, cfg.rollout)),
            ("reward.num_replicas", plan.reward_replicas, unit(cfg.reward.cpus_per_replica, 0, cfg.reward))]


def check_resources(roles: list[tuple[str, int, dict]], total: dict[str, float], where: str,
                    nodes: list[dict[str, float]] | None = None, key: str | None = None) -> list[str]:
    """Totals asked vs `total`; with `nodes`, also that one unit of each role fits some node."""
    problems = []
    asked: dict[str, float] = {}
    for _, n, bundle in roles:
        for r, v in bundle.items():
            asked[r] = asked.get(r, 0.0) + n * v
    for r, amount in asked.items():
        have = float(total.get(r, 0.0))
        if amount > have + 1e-9:
            users = [(k, n, b[r]) for k, n, b in roles if r in b]
            parts = " + ".join(f"{k.split('.')[0]} {n} x {v:g}" for k, n, v in users)
            biggest = max(users, key=lambda u: u[1] * u[2])
            problems.append(f"{key or biggest[0] + '=' + str(biggest[1])}: the job needs {amount:g} {r} "
                            f"({parts}) but {where} has {have:g}")
    for k, _, bundle in roles if nodes else ():
        if not any(all(node.get(r, 0.0) >= v - 1e-9 for r, v in bundle.items()) for node in nodes):
            shape = ", ".join(f"{r}: {v:g}" for r, v in bundle.items())
            problems.append(f"{k.split('.')[0]}: one unit needs {{{shape}}} on a single node, and no node of "
                            f"{where} has that much")
    return problems


def preflight(cfg, device, embedded: bool) -> JobPlan:
    """Everything checkable before a Ray session exists, and the job's plan (cluster/plan.py);
    raises one ConfigError listing every problem."""
    from cluster.plan import make_job_plan

    problems: list[str] = []
    try:
        plan = make_job_plan(cfg)
    except ValueError as e:
        plan = None
        problems.append(str(e))
    policy = check_models(cfg, plan, problems)
    check_prompts(cfg, policy is not None, problems)
    check_functions(cfg, problems)
    if embedded and plan is not None:
        problems += check_embedded(cfg, plan, device)
    if embedded and not problems:  # the models are readable: what the embedded cluster must hold
        import psutil

        from cluster.launch.memory_estimate import check_memory

        problems += check_memory(cfg, plan, device, psutil.virtual_memory().available)
    if problems:
        raise ConfigError(*problems)
    return plan


def check_embedded(cfg, plan, device) -> list[str]:
    """An embedded cluster gets max(cores, what the job asks + 4) CPUs unless ray.num_cpus says
    otherwise, this machine's GPUs, and no custom resources."""
    roles = demand(cfg, plan, device)
    custom = sorted({r for _, _, b in roles for r in b} - {"CPU", "GPU"})
    problems = [f"{k.split('.')[0]}.resources: {r} is a custom resource and an embedded cluster has none; attach "
                f"to a cluster whose nodes offer it (--address / ray.address) or remove the key"
                for r in custom for k, _, b in roles if r in b]
    if cfg.ray.num_cpus:
        problems += check_resources([(k, n, {"CPU": b["CPU"]}) for k, n, b in roles], {"CPU": cfg.ray.num_cpus},
                                    "the embedded cluster", key=f"ray.num_cpus={cfg.ray.num_cpus}")
    if device.kind == "cuda":
        import torch

        problems += check_resources([(k, n, {"GPU": b["GPU"]}) for k, n, b in roles if "GPU" in b],
                                    {"GPU": torch.cuda.device_count()}, "this machine")
    return problems


def check_cluster(cfg, plan, device) -> None:
    """Once attached: the job's demand against the cluster's resources (skipped with
    ray.check_resources=false, for an autoscaling cluster that grows on demand)."""
    import ray

    if not cfg.ray.check_resources:
        return
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    where = f"the Ray cluster ({len(nodes)} node(s); ray.check_resources=false if it autoscales)"
    problems = check_resources(demand(cfg, plan, device), ray.cluster_resources(), where, nodes)
    if problems:
        raise ConfigError(*problems)
