"""learner/local.py runs learner/update.py in one plain-torch process; a LearnerRank runs the same
function with DeepSpeed engines. On the same batch both must end with the same weights."""
import uuid

import pytest
import ray
import torch

from learner import algorithm as alg
from learner.group import LearnerGroup
from learner.local import LocalLearner
from support_learner import CPU, experience_table, learner_cfg


def test_local_update_equals_a_one_rank_zero0_group(tiny_models, ray_local):
    """PPO with critic, KL-shaped reward, 2 epochs x 2 minibatches (so the old, reference and value
    passes all run), TIS on planted sampler logprobs, DAPO's Clip-Higher, token-mean loss and
    overlong masking. fp32: every parameter within 1e-6 (measured: identical up to reduction order)."""
    cfg = learner_cfg(num_ranks=1, zero_stage=0)
    cfg.rl.epochs, cfg.rl.minibatch_size, cfg.rl.micro_batch_size = 2, 8, 4
    cfg.rl.clip_high, cfg.rl.loss_aggregation = 0.28, "token_mean"
    cfg.rl.overlong.mode, cfg.rl.rollout_correction.mode = "mask", "tis"
    table = experience_table(n=14, finish_reason=["stop"] * 10 + ["length"] * 4)
    args = dict(plan=alg.make_plan(cfg.rl, temperature=0.9, max_new_tokens=8))
    local = LocalLearner(cfg, str(tiny_models["policy"]), **args)
    before = local.state_dict()
    want = local.train_step(table)
    group = LearnerGroup(cfg, str(tiny_models["policy"]), CPU, namespace=f"learner-{uuid.uuid4().hex[:6]}", **args)
    try:
        got = group.train_step(table)
        params = dict(ray.get(group.publish_object_store()[1], timeout=60).tensors())
    finally:
        group.shutdown()
    after = local.state_dict()
    assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-4  # it did train
    for n, p in after.items():
        torch.testing.assert_close(params[n], p, rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert got["num_truncated"] == want["num_truncated"] == 4
    for k in ("policy_loss", "value_loss", "kl", "entropy", "is_weight_mean", "is_weight_max", "grad_norm"):
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
