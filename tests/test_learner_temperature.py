"""The learner scores the policy the rollouts were sampled from: log_softmax(logits / T).

(1) the learner's passes at T = 0.7 against a hand-written log_softmax(logits / 0.7) of the model;
(2) a real vLLM engine (actors.engine.RolloutEngine, in this process) sampling at T = 0.7: its
    reported logprobs ("processed", see actors/engine.py) equal the learner's scores of the same
    tokens at the same T; with top-k on, the engine's exceed them by exactly -log(kept mass).
"""
import pyarrow as pa
import pytest
import torch

from learner import algorithm as alg
from learner.batch import prepare
from support_learner import experience_table


T = 0.7


@pytest.fixture(scope="module")
def policy(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()


def by_hand(model, b, i: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's response tokens scored one sequence at a time: log_softmax(z / T), and its entropy."""
    p, r = int(b.prompt_lens[i]), int(b.mask[i].sum())
    ids = b.input_ids[i, :p + r].unsqueeze(0)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, p - 1:p + r - 1] / temperature, -1)
    return logp.gather(-1, ids[0, p:].unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_every_pass_scores_logits_over_the_sampling_temperature(policy):
    b = prepare(experience_table(n=6), 0, 0, 1).batch
    with torch.no_grad():
        old = alg.response_logprobs(policy, b, temperature=T)
        logp, ent = alg.policy_logprobs_and_entropy(policy, b, temperature=T)
        untempered = alg.response_logprobs(policy, b)
        for i in range(len(b)):
            r = int(b.mask[i].sum())
            want, want_ent = by_hand(policy, b, i, T)
            torch.testing.assert_close(old[i, :r], want, rtol=0, atol=1e-5)
            torch.testing.assert_close(logp[i, :r], want, rtol=0, atol=1e-5)
            torch.testing.assert_close(ent[i, :r], want_ent, rtol=0, atol=1e-5)
    assert (untempered - old).abs().max() > 1e-2  # T = 0.7 is not T = 1 for this model


def test_greedy_is_scored_at_temperature_one():
    assert alg.scoring_temperature(0.0) == 1.0
    assert alg.scoring_temperature(0.7) == 0.7
    with pytest.raises(ValueError, match="temperature"):
        alg.scoring_temperature(-1.0)


@pytest.fixture(scope="module")
def engine(tiny_models):
    from actors.config import EngineConfig
    from actors.engine import RolloutEngine
    from contract.devices import DeviceProfile

    return RolloutEngine(str(tiny_models["policy"]), EngineConfig(max_model_len=128, kv_cache_bytes=64 << 20),
                         DeviceProfile("cpu"))


def engine_batch(engine, **sampling):
    from actors.config import SamplingConfig

    prompts = pa.table({"prompt_id": [f"p{i}" for i in range(4)],
                        "prompt": ["red green blue", "the cat", "one two three four", "a"]})
    rows = pa.Table.from_batches([engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=8, seed=0, **sampling),
                                                  version=0, worker_id="w")])
    n = rows.num_rows
    table = experience_table(n=n, prompt_ids=rows["prompt_ids"].to_pylist(),
                             response_ids=rows["response_ids"].to_pylist(),
                             logprobs=rows["logprobs"].to_pylist())
    return prepare(table, 0, 0, 1).batch


def test_engine_reports_the_logprobs_the_learner_scores_at_the_same_temperature(engine, policy):
    """fp32 on both sides (vLLM's CPU kernels differ from transformers' below 2e-5, see
    test_learner_sync). Before the fix the engine reported untempered logprobs and the learner
    scored untempered logits: both sides off the sampled policy."""
    b = engine_batch(engine, temperature=T)
    with torch.no_grad():
        learner = alg.response_logprobs(policy, b, temperature=T)
        untempered = alg.response_logprobs(policy, b)
    m = b.mask.bool()
    torch.testing.assert_close(b.rollout_logprobs[m], learner[m], rtol=0, atol=2e-5)
    assert (b.rollout_logprobs[m] - untempered[m]).abs().max() > 1e-2


def test_with_top_k_the_engine_logprob_is_renormalised_over_the_kept_tokens(engine, policy):
    """processed logprobs include top-k's renormalisation: engine = log p_T(a) - log(sum of the k
    likeliest p_T), which the learner (untruncated) cannot reproduce; the gap is exactly that mass."""
    k = 5
    b = engine_batch(engine, temperature=T, top_k=k)
    with torch.no_grad():
        learner = alg.response_logprobs(policy, b, temperature=T)
        for i in range(len(b)):
            p, r = int(b.prompt_lens[i]), int(b.mask[i].sum())
            logits = policy(input_ids=b.input_ids[i, :p + r].unsqueeze(0)).logits[0, p - 1:p + r - 1]
            kept_mass = torch.softmax(logits / T, -1).topk(k, -1).values.sum(-1)
            torch.testing.assert_close(b.rollout_logprobs[i, :r] - learner[i, :r], -kept_mass.log(), rtol=0, atol=3e-5)


def test_learner_group_scores_at_its_sampling_temperature(tiny_models, ray_local, policy):
    """LearnerGroup(plan=make_plan(temperature=0.7)) hands T to its ranks: with rollout logprobs taken
    at T = 0.7 from the same weights, the old pass (the logprob_gap metric) agrees with them."""
    import uuid

    from learner.group import LearnerGroup
    from support_learner import CPU, learner_cfg

    table = experience_table(n=8)
    b = prepare(table, 0, 0, 1).batch
    with torch.no_grad():
        lp = alg.response_logprobs(policy, b, temperature=T)
    table = experience_table(n=8, logprobs=[lp[i, :int(b.mask[i].sum())].tolist() for i in range(8)])
    cfg = learner_cfg(num_ranks=1, zero_stage=0)
    group = LearnerGroup(cfg, str(tiny_models["policy"]), CPU, namespace=f"learner-{uuid.uuid4().hex[:6]}",
                         plan=alg.make_plan(cfg.rl, temperature=T))
    try:
        metrics = group.train_step(table)
    finally:
        group.shutdown()
    assert metrics["logprob_gap"] < 1e-5
