"""Seeded sampling on vLLM's CPU build (actors.engine.RolloutEngine in this process, tiny model).

A batch whose prompt tokens exceed one scheduler step's budget (max_num_batched_tokens, 4096 for
vllm.LLM on CPU) used to crash: with chunked prefill vLLM prefilled the last admitted prompt partly,
sampled it anyway and rewound its per-request torch.Generator with `set_offset`, which CPU
generators do not have ("CPU Generator does not use offset"). The device profile turns chunked
prefill off on CPU (contract/devices.py); these tests check that such a batch generates, that the
same prompt_id + seed gives the same tokens in one batch or cut in two (as the pool's chunks cut
it), and that a KV cache too small for the batch (requests preempted and recomputed) changes no
seeded sample either.
"""
import random

import pyarrow as pa
import pytest

from actors.config import EngineConfig, SamplingConfig
from actors.engine import RolloutEngine
from contract.devices import DeviceProfile

pytestmark = pytest.mark.component  # starts vLLM engines (imported inside actors.engine)

SEEDED = SamplingConfig(n=2, max_new_tokens=8, seed=3)


def long_prompts(n: int, length: int, start: int = 0) -> pa.Table:
    """n prompts of `length` token ids each (ids given, so the length is exact), ids p{start}..."""
    rng = random.Random(0)
    ids = [[rng.randrange(4, 500) for _ in range(length)] for _ in range(start + n)][start:]
    return pa.table({"prompt_id": [f"p{i}" for i in range(start, start + n)], "prompt": ["x"] * n,
                     "prompt_ids": ids})


def samples(engine: RolloutEngine, table: pa.Table, sampling: SamplingConfig = SEEDED) -> dict:
    out = engine.generate(table, sampling, version=0, worker_id="w")
    return dict(zip(zip(out.column("prompt_id").to_pylist(), out.column("sample_idx").to_pylist()),
                    out.column("response_ids").to_pylist()))


@pytest.fixture(scope="module")
def engine(tiny_models):
    return RolloutEngine(str(tiny_models["policy"]), EngineConfig(max_model_len=512, kv_cache_bytes=32 << 20),
                         DeviceProfile("cpu"))


def test_a_seeded_batch_over_the_step_budget_generates_the_same_samples_whole_or_cut(engine):
    config = engine.llm.llm_engine.vllm_config
    budget, block = config.scheduler_config.max_num_batched_tokens, config.cache_config.block_size
    # Prompts shorter than one KV block: a prompt's n samples share no cached block, so each of
    # them prefills all 100 tokens and the batch's prefill is 24 * 100 * 2 = 4800 tokens.
    batch = long_prompts(24, 100)
    assert 100 < block and 24 * 100 * SEEDED.n > budget, "the batch must not fit one step, or it tests nothing"
    assert 12 * 100 * SEEDED.n <= budget  # each half fits one step: prefilled whole with or without the fix

    whole = samples(engine, batch)  # before the fix: RuntimeError: CPU Generator does not use offset
    assert set(whole) == {(f"p{i}", s) for i in range(24) for s in range(2)}
    assert all(1 <= len(r) <= 8 for r in whole.values())
    assert len({tuple(r) for r in whole.values()}) > 24  # real samples, not one repeated answer
    assert samples(engine, batch) == whole
    halves = samples(engine, long_prompts(12, 100)) | samples(engine, long_prompts(12, 100, start=12))
    assert halves == whole


def test_preemption_in_a_small_kv_cache_changes_no_seeded_sample(engine, tiny_models):
    """8 blocks of 128 tokens: 16 sequences of 120 prompt tokens all need a second block as they
    pass 128 tokens, so running requests are preempted and recomputed; seeded samples stay those of
    the roomy engine."""
    small = RolloutEngine(str(tiny_models["policy"]), EngineConfig(max_model_len=512, kv_cache_bytes=1 << 20),
                          DeviceProfile("cpu"))
    batch, sampling = long_prompts(8, 120), SamplingConfig(n=2, max_new_tokens=16, seed=5)
    assert samples(small, batch, sampling) == samples(engine, batch, sampling)
