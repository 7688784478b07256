"""Weights from a 2-rank ZeRO-3 learner into a live vLLM engine, by both transports: afterwards the
engine's log-probs of a fixed sequence equal the learner's own (HF forward of its published weights).

The engine is a minimal Ray actor (`support_learner.Engine`; the project's rollout worker lives in
actors/, which the learner must not import); it receives exactly as a worker does: join the side
group, `contract.weights.receive_weights`, then vLLM `reload_weights` + `reset_prefix_cache`.
"""
import uuid

import pytest
import ray

from contract.weights import GroupAddress
from contract.net import free_port
from support_learner import engine_actor, experience_table, hf_logprobs, make_group, PROMPT, RESPONSE, TOLERANCE

# fp32 on both sides; vLLM's CPU attention/matmul order differs from transformers' (measured below 1e-5).


@pytest.fixture(scope="module", params=["tiny", "tiny-tied"])
def models(request, tiny_models, tmp_path_factory):
    """The tiny model and its tied-embedding twin: vLLM's reload unties a tied LM head, so the sync
    must carry it by name (without that the tied engine kept its step-0 head: logprobs off by 0.1)."""
    if request.param == "tiny":
        return tiny_models
    from cluster.demo.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tied"), size="tiny-tied")


@pytest.fixture(scope="module")
def engine(models, ray_local):
    with engine_actor(models["policy"]) as actor:
        yield actor


def test_published_weights_give_the_engine_the_learners_logprobs(models, engine):
    policy = str(models["policy"])
    group = make_group(models, num_ranks=2, zero_stage=3)
    try:
        before = ray.get(engine.logprobs.remote(PROMPT, RESPONSE), timeout=120)
        v0, ref0 = group.publish_object_store()
        assert v0 == 0
        assert before == pytest.approx(hf_logprobs(policy, ray.get(ref0, timeout=60)), abs=TOLERANCE)

        # (a) broadcast over a side gloo group: learner rank 0 = group rank 0, the engine = rank 1
        group.train_step(experience_table(seed=3))
        addr = GroupAddress("127.0.0.1", free_port(), 2, f"learner-test-{uuid.uuid4().hex[:6]}", timeout_s=60)
        ray.get([group.join_weight_group(addr), engine.join.remote(addr, 1)], timeout=120)
        manifest = group.weight_manifest()
        assert manifest.specs == ray.get(ref0, timeout=60).specs
        sent, got_version = ray.get([group.broadcast_weights(), engine.receive.remote(manifest, group.version)],
                                    timeout=120)
        assert sent == got_version == group.version == 1
        after_bcast = ray.get(engine.logprobs.remote(PROMPT, RESPONSE), timeout=120)
        v1, ref1 = group.publish_object_store()
        assert after_bcast == pytest.approx(hf_logprobs(policy, ray.get(ref1, timeout=60)), abs=TOLERANCE)
        assert max(abs(a - b) for a, b in zip(after_bcast, before)) > 10 * TOLERANCE  # the weights did change
        group.leave_weight_group()
        ray.get(engine.leave.remote(), timeout=60)

        # (b) the Ray object store: one ray.put on rank 0, the engine fetches it
        group.train_step(experience_table(seed=4, version=1))
        v2, ref2 = group.publish_object_store()
        assert v2 == 2
        assert ray.get(engine.load_state_dict.remote([ref2], v2), timeout=120) == 2
        after_put = ray.get(engine.logprobs.remote(PROMPT, RESPONSE), timeout=120)
        assert after_put == pytest.approx(hf_logprobs(policy, ray.get(ref2, timeout=60)), abs=TOLERANCE)
        assert max(abs(a - b) for a, b in zip(after_put, after_bcast)) > 10 * TOLERANCE
    finally:
        group.shutdown()
