"""Rollout logic that needs no engine: balancing, prompt checks, config limits, exactly-once order."""
import pyarrow as pa
import pytest
from pydantic import ValidationError

from actors.balance import expected_tokens, split_balanced
from actors.config import EngineConfig, RolloutConfig, SamplingConfig
from actors.engine import kv_cache_bytes, prompt_seed
from contract.experience import ExperienceError, ordered_exactly_once
from actors.prompts import PromptError, check_prompt_lengths, check_prompt_table
from contract.experience import rollout_batch


def test_split_balances_expected_tokens_not_count():
    # One long prompt and six short ones: by count 4/3, by work the long one stands alone.
    costs = expected_tokens([300, 10, 10, 10, 10, 10, 10], max_new_tokens=20, n=2)
    chunks = split_balanced(costs, 2)
    assert sorted(r for c in chunks for r in c) == list(range(7))
    assert chunks[0] == [0]
    assert [sum(costs[r] for r in c) for c in chunks] == [340, 300]


def test_split_never_makes_empty_chunks_and_is_deterministic():
    assert split_balanced([5, 5], 8) == [[0], [1]]
    costs = [7, 3, 9, 1, 4, 4, 8]
    assert split_balanced(costs, 3) == split_balanced(costs, 3)
    loads = sorted(sum(costs[r] for r in c) for c in split_balanced(costs, 3))
    assert loads == [12, 12, 12]


@pytest.mark.parametrize("table, match", [
    (pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), "empty batch"),
    (pa.table({"prompt_id": ["a"], "prompt": [123]}), r"prompts\.prompt: expected string values \(got int64\)"),
    (pa.table({"prompt_id": ["a", "b"], "prompt": ["x", None]}), r"prompts\.prompt: expected a string in every row"),
    (pa.table({"prompt_id": ["a"]}), "missing column 'prompt'"),
    (pa.table({"prompt_id": ["a", "a"], "prompt": ["x", "y"]}), "unique ids .*'a'"),
])
def test_bad_prompt_tables_are_one_line_errors(table, match):
    with pytest.raises(PromptError, match=match):
        check_prompt_table(table)


def test_prompt_must_leave_room_for_one_token():
    check_prompt_lengths(["a"], [[1] * 15], 16)
    with pytest.raises(PromptError, match=r"prompt 'b': 16 tokens, expected fewer than rollout.engine.max_model_len=16"):
        check_prompt_lengths(["a", "b"], [[1], [1] * 16], 16)


def test_sampling_limits_are_config_errors():
    with pytest.raises(ValidationError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValidationError, match="n"):
        SamplingConfig(n=0)
    with pytest.raises(ValidationError, match="chunks_per_worker"):
        RolloutConfig(chunks_per_worker=0)


def test_prompt_seed_is_stable_and_per_prompt():
    assert prompt_seed(None, "a") is None
    assert prompt_seed(1, "a") == prompt_seed(1, "a") != prompt_seed(1, "b")
    assert prompt_seed(1, "a") != prompt_seed(2, "a")


def _row(pid, s):
    return {"prompt_id": pid, "sample_idx": s, "prompt": "p", "prompt_ids": [1], "response": "r",
            "response_ids": [2], "logprobs": [-1.0], "finish_reason": "length", "policy_version": 0,
            "worker_id": "w", "gen_s": 0.1}


def test_exactly_once_orders_by_prompt_then_sample_and_rejects_gaps_and_duplicates():
    t = pa.Table.from_batches([rollout_batch([_row("b", 1), _row("a", 0), _row("b", 0), _row("a", 1)])])
    out = ordered_exactly_once(t, ["b", "a"], 2)
    assert list(zip(out["prompt_id"].to_pylist(), out["sample_idx"].to_pylist())) == [
        ("b", 0), ("b", 1), ("a", 0), ("a", 1)]
    with pytest.raises(ExperienceError, match="missing e.g. .*'a', 1"):
        ordered_exactly_once(t.slice(0, 3), ["b", "a"], 2)
    dup = pa.concat_tables([t, t.slice(0, 1)])
    with pytest.raises(ExperienceError, match="got 5 rows"):
        ordered_exactly_once(dup, ["b", "a"], 2)


def test_default_kv_cache_fits_the_model_not_a_constant(tiny_models):
    """K and V for every layer, kv head and head dim, per token, times max_model_len x kv_cache_seqs.
    The tiny model: 2 layers x 2 kv heads x head_dim 32 -> 128 values per token for K and V each."""
    policy = str(tiny_models["policy"])
    assert kv_cache_bytes(policy, EngineConfig(dtype="float32")) == 2 * 128 * 4 * 512 * 64
    assert kv_cache_bytes(policy, EngineConfig(dtype="bfloat16", max_model_len=128, kv_cache_seqs=8)) == \
        2 * 128 * 2 * 128 * 8
    assert kv_cache_bytes(policy, EngineConfig(dtype="auto")) == 2 * 128 * 4 * 512 * 64  # saved as float32
    assert kv_cache_bytes(policy, EngineConfig(kv_cache_bytes=16 << 20)) == 16 << 20  # set by hand: kept


def test_a_chunk_travels_as_lists_and_arrives_as_the_prompt_batch_the_engine_reads():
    """The pool's wire format (actors/dispatch.py): what a worker unpickles is the typed RecordBatch, and
    the sampling config pickled once arrives equal."""
    import pickle

    import ray.cloudpickle

    from actors.dispatch import Pickled, PromptSlice
    sliced = PromptSlice(["q1", "q2"], ["red", "blue cat"], [[1, 5], [1, 6, 7]])
    batch = ray.cloudpickle.loads(ray.cloudpickle.dumps(sliced))
    assert isinstance(batch, pa.RecordBatch)
    check_prompt_table(batch)
    assert batch.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert batch.to_pydict() == {"prompt_id": ["q1", "q2"], "prompt": ["red", "blue cat"],
                                 "prompt_ids": [[1, 5], [1, 6, 7]]}
    sampling = SamplingConfig(n=3, max_new_tokens=7, temperature=0.7, seed=2)
    assert pickle.loads(pickle.dumps(Pickled(sampling))) == sampling


def test_concat_of_like_batches_equals_concat_one_by_one():
    """The one-pass path for the pool's batches gives the same table (optional columns added, same order)."""
    from contract.experience import ROLLOUT_SCHEMA, concat

    batches = [rollout_batch([_row("a", 0), _row("a", 1)]), rollout_batch([_row("b", 0)])]
    fast = concat(batches)
    slow = concat([pa.Table.from_batches([b]) for b in batches])  # Tables take the one-by-one path
    assert fast.schema.equals(ROLLOUT_SCHEMA) and fast.equals(slow)
    assert fast.column("prompt_id").to_pylist() == ["a", "a", "b"] and fast.column("messages").null_count == 3
