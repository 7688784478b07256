"""One vLLM engine turned into an Arrow-in, Arrow-out sampler (no Ray here).

`RolloutWorker` wraps it in an actor; the benchmark calls it directly in one process, so the
pool-vs-direct comparison measures exactly the Ray/pool overhead and nothing else.
"""
from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Callable, Iterable

import pyarrow as pa
import torch

from actors.adapter import AdapterSlot, lora_engine_kwargs
from actors.config import EngineConfig, SamplingConfig
from actors.prompts import check_prompt_table, check_prompt_lengths
from contract.devices import DeviceProfile
from contract.experience import rollout_batch


def prompt_seed(seed: int | None, prompt_id: str) -> int | None:
    """A stable per-prompt seed: the same prompt draws the same samples on any worker, in any chunk."""
    return None if seed is None else zlib.crc32(f"{seed}:{prompt_id}".encode()) & 0x7FFFFFFF


# vLLM's `logprobs_mode`: report the logprobs of the distribution actually sampled from (see
# `sampling_params`), not vLLM's default "raw_logprobs" (the untempered model).
LOGPROBS_MODE = "processed_logprobs"


def sampling_params(s: SamplingConfig, seed: int | None):
    """vLLM sampling parameters; each sampled token comes with its logprob in LOGPROBS_MODE.

    "processed_logprobs" are taken after temperature, top-k and top-p: log_softmax(logits / T)
    over the tokens the sampler kept. The learner scores log_softmax(logits / T) too
    (learner.algorithm.scoring_temperature), so at any temperature the two agree up to kernels and
    weights, and `logprob_gap` compares like with like. top-k / top-p: the processed logprobs are
    renormalised over the kept tokens, log p_T(a) - log(kept mass), which the learner cannot
    reproduce (it scores the untruncated softmax); with either on, the engine's logprob is >= the
    learner's by the log of the mass cut away, and that shows in `logprob_gap`. Greedy requests
    (T = 0) report the untempered logprobs, which is also what the learner scores them at.
    """
    from vllm import SamplingParams

    # logprobs=0: vLLM returns the logprob of the sampled token only (in LOGPROBS_MODE).
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0),
                          max_tokens=s.max_new_tokens, stop=list(s.stop) or None, seed=seed, logprobs=0)


def kv_cache_bytes(model_dir: str, cfg: EngineConfig) -> int:
    """The configured size, else room for `kv_cache_seqs` full-length sequences of this model. A
    fixed default cannot fit every model: 64 MiB holds 1.8k tokens of a 12-layer, 768-wide model
    in bf16, so a 32-sample batch is cut into waves and generation takes ~1.8x as long."""
    if cfg.kv_cache_bytes:
        return cfg.kv_cache_bytes
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    dtype = (getattr(hf, "dtype", None) or "float32") if cfg.dtype == "auto" else cfg.dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    per_token = 2 * hf.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return per_token * cfg.max_model_len * cfg.kv_cache_seqs


class RolloutEngine:
    """An in-process `vllm.LLM` plus the tokenizer, with weights replaceable in place, or (with
    `cfg.lora_rank`) a LoRA adapter served on top of the base weights (actors/adapter.py)."""

    def __init__(self, model_dir: str, cfg: EngineConfig, device: DeviceProfile):
        import vllm

        if cfg.dtype == "auto":  # jobs resolve it once on the driver; here for direct users (benchmarks)
            cfg = cfg.model_copy(update={"dtype": device.compute_dtype()})
        self.cfg = cfg
        self.llm = vllm.LLM(model=str(model_dir), dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
                            tensor_parallel_size=cfg.tensor_parallel_size, logprobs_mode=LOGPROBS_MODE,
                            **lora_engine_kwargs(cfg.lora_rank),
                            **device.vllm_engine_kwargs(kv_cache_bytes(model_dir, cfg), cfg.gpu_memory_utilization))
        self.tokenizer = self.llm.get_tokenizer()
        self.adapter = AdapterSlot()

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts)["input_ids"]

    def generate(self, prompts: pa.Table, sampling: SamplingConfig, version: int, worker_id: str,
                 between_steps: Callable[[int], int] | None = None) -> pa.RecordBatch:
        """One row per (prompt, sample) in ROLLOUT_SCHEMA. Uses a `prompt_ids` column when the caller
        already tokenized (the pool does), else tokenizes here. `gen_s` is this call's wall time.
        `between_steps(version) -> version`: called before every engine step; it may load a new policy
        version mid-generation (in-flight updates, `run_steps`). Each token's `token_versions` entry is
        the version that sampled it; `policy_version` is the first token's (the oldest)."""
        check_prompt_table(prompts)
        ids_col = prompts.column("prompt_id").to_pylist()
        texts = prompts.column("prompt").to_pylist()
        token_ids = (prompts.column("prompt_ids").to_pylist() if "prompt_ids" in prompts.column_names
                     else self.tokenize(texts))
        check_prompt_lengths(ids_col, token_ids, self.cfg.max_model_len)
        params = [sampling_params(sampling, prompt_seed(sampling.seed, pid)) for pid in ids_col]
        t0 = time.perf_counter()
        outs, tags = self.run_steps(token_ids, params, version, between_steps)
        gen_s = time.perf_counter() - t0
        rows = []
        for i, (pid, text, toks, samples) in enumerate(zip(ids_col, texts, token_ids, outs)):
            for c in samples:
                resp = list(c.token_ids)
                versions = tags[(i, c.index)][:len(resp)] or [version]
                rows.append({"prompt_id": pid, "sample_idx": c.index, "prompt": text, "prompt_ids": list(toks),
                             "response": c.text, "response_ids": resp,
                             "logprobs": [lp[t].logprob for t, lp in zip(resp, c.logprobs or [])],
                             "finish_reason": c.finish_reason or "length", "policy_version": versions[0],
                             "worker_id": worker_id, "gen_s": gen_s, "token_versions": versions})
        return rollout_batch(rows)

    def run_steps(self, token_ids: list[list[int]], params: list, version: int,
                  between_steps: Callable[[int], int] | None) -> tuple[list[list], dict[tuple[int, int], list[int]]]:
        """What `LLM.generate` does inside (add the requests, step the engine until all finish), with a
        hook between two steps. The tokens a step emits were sampled by that step's forward, so they
        are tagged with the version served when the step began. Returns, per input, its samples'
        final CompletionOutputs (by sample index) and, per (input index, sample index), the version of
        each emitted token. If anything raises, the unfinished requests are aborted: the engine is
        left empty."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        names = [f"{uuid.uuid4().hex[:8]}-{i}" for i in range(len(token_ids))]
        index = {name: i for i, name in enumerate(names)}
        latest: dict[tuple[int, int], object] = {}  # (input, sample) -> its CompletionOutput so far (cumulative)
        tags: dict[tuple[int, int], list[int]] = {}
        finished: set[str] = set()
        try:
            for name, toks, p in zip(names, token_ids, params):
                engine.add_request(name, TokensPrompt(prompt_token_ids=toks), p, lora_request=self.adapter.request)
            while engine.has_unfinished_requests():
                if between_steps is not None:
                    version = between_steps(version)
                for out in engine.step():  # n > 1: one output per sample that advanced, each cumulative
                    for c in out.outputs:
                        key = (index[out.request_id], c.index)
                        latest[key] = c
                        seen = tags.setdefault(key, [])
                        seen.extend([version] * (len(c.token_ids) - len(seen)))
                    if out.finished:
                        finished.add(out.request_id)
        except BaseException:
            engine.abort_request([n for n in names if n not in finished])
            raise
        outs = [[latest[(i, j)] for j in range(p.n)] for i, p in enumerate(params)]
        return outs, tags

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors into the live engine; the prefix cache would otherwise serve stale KV."""
        if self.adapter.request is not None:
            raise RuntimeError("rollout engine: full weights sent to an engine serving a LoRA adapter")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        self._drop_stale_kv()

    def load_adapter(self, version: int, named: Iterable[tuple[str, torch.Tensor]], config_json: str) -> None:
        """A LoRA adapter (PEFT names, its adapter_config.json) served from now on as policy `version`."""
        if not self.cfg.lora_rank:
            raise RuntimeError("rollout engine: a LoRA adapter sent to an engine started without LoRA "
                               "(rollout.engine.lora_rank 0; a job's plan sets it from learner.lora)")
        self.adapter.load(self.llm, version, named, config_json)
        self._drop_stale_kv()

    def _drop_stale_kv(self) -> None:
        """After new weights: no KV computed under the old ones is used again. Cached prefixes are
        dropped, and sequences in flight (an in-flight update, between two `run_steps` steps) are
        preempted, so vLLM recomputes their prompt and tokens so far under the new weights before
        sampling on (their seeded generators carry on): each later token's logprob is exactly the new
        version's, never a mix of old KV and new weights."""
        self.llm.reset_prefix_cache(reset_running_requests=True)
