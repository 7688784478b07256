"""The memory knobs on real DeepSpeed ranks: 2 ZeRO-3 ranks (Ray actors, gloo, tiny model, fp32; the
forwards are collective, so the ranks must agree on the token-budget micro-batch count) with
activation checkpointing and a token budget take the default update, as learner/local.py's
LocalLearner computes it (tests/test_learner_local.py: equal to a 1-rank ZeRO-0 group), and report
peak_mem_mb every step. PPO (policy + critic + KL reference), two minibatches, so the old-policy,
reference and value passes all run. Tolerance: 2 ranks vs 1 (2e-5: summation order only)."""
import pytest
import ray
import torch

from learner.local import LocalLearner
from support_learner import learner_cfg, make_group, params, ragged_table

KNOBS = dict(gradient_checkpointing=True, max_tokens_per_micro_batch=40)


def test_two_zero3_ranks_with_checkpointing_and_a_token_budget_take_the_default_step(tiny_models, ray_local):
    def probe(rank):
        """On a rank (`__ray_call__`; nested, so Ray pickles it by value): record each policy forward
        (grad mode, rows, width) and count the first decoder layer's MLP calls (a checkpointed layer
        runs again in the backward)."""
        import torch

        seen = rank.probe = {"forwards": [], "mlp": 0}

        def forward(_, __, kw):
            seen["forwards"].append((torch.is_grad_enabled(), *kw["input_ids"].shape))

        def mlp(*_):
            seen["mlp"] += 1

        module = rank.actor.module
        module.register_forward_pre_hook(forward, with_kwargs=True)
        module.model.layers[0].mlp.register_forward_pre_hook(mlp)
        return module.is_gradient_checkpointing

    local = LocalLearner(learner_cfg(), str(tiny_models["policy"]))
    before = local.state_dict()
    want_metrics = local.train_step(ragged_table())
    want = local.state_dict()
    group = make_group(tiny_models, num_ranks=2, zero_stage=3, **KNOBS)
    try:
        handles = group._ranks.handles
        assert ray.get([h.__ray_call__.remote(probe) for h in handles], timeout=60) == [True, True]
        metrics = group.train_step(ragged_table())
        got = params(group)
        seen = ray.get([h.__ray_call__.remote(lambda rank: rank.probe) for h in handles], timeout=60)
        second = group.train_step(ragged_table(seed=1, version=1))
    finally:
        group.shutdown()
    for s in seen:
        grad = [(rows, width) for g, rows, width in s["forwards"] if g]
        assert all(rows * width <= 40 or rows == 1 for rows, width in grad)  # packed under the budget
        assert len({width for _, width in grad}) > 2  # each cut to its own longest, not the batch's
        assert s["mlp"] == len(s["forwards"]) + len(grad)  # every grad forward recomputed in the backward
    assert len({sum(g for g, *_ in s["forwards"]) for s in seen}) == 1  # ZeRO-3: the same count on both
    assert max((want[n] - before[n]).abs().max().item() for n in want) > 1e-4  # it did train
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=2e-5, msg=lambda m: f"{n}: {m}")
    for m in ("policy_loss", "value_loss", "kl", "entropy", "logprob_gap", "grad_norm"):
        assert metrics[m] == pytest.approx(want_metrics[m], abs=1e-5), m
    for m in (metrics, second):  # every step: the ranks' largest resident peak, MiB
        assert 100 < m["peak_mem_mb"] < 64 * 1024
