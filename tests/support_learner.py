"""Shared test helpers (not a test module): learner configs and groups, experience tables, a vLLM engine actor."""
from __future__ import annotations

import uuid
from contextlib import contextmanager

import pyarrow as pa
import ray
import torch

from contract.devices import DeviceProfile
from contract.experience import EXPERIENCE_SCHEMA
from contract.weights import GroupAddress
from learner.config import LearnerConfig
from learner.group import LearnerGroup


CPU = DeviceProfile("cpu")


def experience_table(n: int = 16, version: int = 0, seed: int = 0, group_size: int = 4, **columns) -> pa.Table:
    """Random prompts/responses of varied lengths, directly in EXPERIENCE_SCHEMA; `columns`
    overrides whole columns (name -> list of values)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt, response = torch.randint(4, 400, (3 + i % 3,), generator=g), torch.randint(4, 400, (2 + i % 5,), generator=g)
        rows.append(dict(prompt_id=f"p{i // group_size}", sample_idx=i % group_size, prompt="p",
                         prompt_ids=prompt.tolist(), response="r", response_ids=response.tolist(),
                         logprobs=[-6.0] * len(response), finish_reason="length", policy_version=version,
                         worker_id="w0", gen_s=0.1, reward=float(i % 3), reward_valid=True, reward_parts={"fn": 1.0}))
    for name, values in columns.items():
        for row, v in zip(rows, values):
            row[name] = v
    return pa.Table.from_pylist(rows, schema=EXPERIENCE_SCHEMA)


def learner_cfg(**kw) -> LearnerConfig:
    cfg = LearnerConfig(lr=1e-3, critic_lr=1e-3, **kw)
    cfg.rl.minibatch_size, cfg.rl.micro_batch_size = 8, 8 // cfg.num_ranks // 2
    return cfg


def make_group(tiny_models, **kw) -> LearnerGroup:
    return LearnerGroup(learner_cfg(**kw), str(tiny_models["policy"]), CPU, namespace=f"learner-{uuid.uuid4().hex[:6]}")


def params(group: LearnerGroup) -> dict[str, torch.Tensor]:
    import ray

    return dict(ray.get(group.publish_object_store()[1], timeout=60).tensors())


def ragged_table(n: int = 14, seed: int = 0, version: int = 0):
    """Prompts of 3-8 tokens, responses of 1-24: lengths far apart, as real rollouts are."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, 400, (3 + (5 * i) % 6,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(4, 400, (1 + (7 * i) % 24,), generator=g).tolist() for i in range(n)]
    return experience_table(n=n, version=version, seed=seed, prompt_ids=prompts, response_ids=responses,
                            logprobs=[[-6.0] * len(r) for r in responses])


PROMPT, RESPONSE = [5, 17, 42, 99, 7], [300, 12, 250, 8, 77, 131]


TOLERANCE = 2e-5


@ray.remote(num_cpus=1)
class Engine:
    def __init__(self, model_dir: str):
        import vllm

        self.llm = vllm.LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=128,
                            kv_cache_memory_bytes=64 << 20, seed=0)
        self.version, self.group = 0, None

    def join(self, addr: GroupAddress, rank: int) -> None:
        from contract.weights import join_group

        self.group = join_group(addr, rank)

    def leave(self) -> None:
        from contract.weights import leave_group

        leave_group(self.group)

    def _reload(self, named, version: int) -> int:
        from contract.weights import check_version

        if check_version(self.version, version):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
            self.llm.reset_prefix_cache()
            self.version = version
        return self.version

    def receive(self, manifest, version: int) -> int:
        from contract.weights import receive_weights

        return self._reload([(n, t.clone()) for n, t in receive_weights(self.group, manifest)], version)

    def load_state_dict(self, wrapped: list, version: int) -> int:
        return self._reload(list(ray.get(wrapped[0], timeout=60).tensors()), version)

    def logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        from vllm import SamplingParams, TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt + response)],
                                SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        plp = out[0].prompt_logprobs
        return [plp[len(prompt) + i][tok].logprob for i, tok in enumerate(response)]


def hf_logprobs(policy_dir, packed) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    model.load_state_dict(dict(packed.tensors()))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + RESPONSE])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return [lp[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(RESPONSE)]


@contextmanager
def engine_actor(model_dir):
    """An `Engine` actor on `model_dir` with the CPU profile's one-thread environment, killed on exit."""
    actor = Engine.options(runtime_env={"env_vars": CPU.actor_env(threads=1)}).remote(str(model_dir))
    try:
        yield actor
    finally:
        ray.kill(actor)
