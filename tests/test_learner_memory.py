"""Memory knobs of the learner, in one process (no Ray): activation checkpointing recomputes every
decoder layer and leaves the gradient as it was; token-budget micro-batches (learner/micro.py)
cover each sample once, stay under the budget, give every rank the same count and the same
gradient as the fixed-count cut; learner/local.py's LocalLearner runs both knobs (trimmed
micro-batches, recomputed layers) to the default step's weights and reports peak_mem_mb each step.
The same knobs on real DeepSpeed ranks: tests/test_learner_memory_group.py."""
import pytest
import torch

from learner import algorithm as alg
from learner import micro
from learner.batch import prepare
from learner.config import LearnerConfig, RLConfig

from support_learner import learner_cfg, ragged_table


def policy(tiny_models, **cfg):
    from learner.models import load_policy

    return load_policy(LearnerConfig(**cfg), str(tiny_models["policy"]))


def grads_of(model, cfg: RLConfig, b, tg, parts, norm) -> list[torch.Tensor]:
    model.zero_grad()
    for part in parts:
        mb, mtg = micro.take(b, tg, part)
        alg.actor_loss(cfg, model, mb, mtg, alg.sample_weights(mb, norm, mtg.keep))[0].backward()
    return [p.grad.clone() for p in model.parameters()]


def targets(model, cfg: RLConfig, b):
    with torch.no_grad():
        old = alg.response_logprobs(model, b)
    ref = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    return alg.compute_targets(cfg, b, old, ref, None)


def test_checkpointing_recomputes_every_layer_and_keeps_the_gradient(tiny_models):
    cfg = RLConfig(algorithm="grpo", minibatch_size=16, micro_batch_size=16)
    b = prepare(ragged_table(), 0, 0, 16).batch
    plain, ckpt = policy(tiny_models), policy(tiny_models, gradient_checkpointing=True)
    assert not plain.training and not any(m.training for m in ckpt.modules() if isinstance(m, torch.nn.Dropout))
    calls = {"n": 0}
    layers = ckpt.model.layers
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    tg = targets(plain, cfg, b)
    rows = torch.arange(len(b))
    calls["n"] = 0
    got = grads_of(ckpt, cfg, b, tg, [rows], 14.0)
    assert calls["n"] == 2 * len(layers)  # forward + recomputation in the backward (pre-hooks: torch stops
    # a recomputation once it has every saved tensor back, before a module's forward hook would fire)
    want = grads_of(plain, cfg, b, tg, [rows], 14.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-7)
    assert ckpt.config.use_cache is False


def test_token_budget_plan_covers_each_sample_once_under_the_budget_with_equal_counts():
    b = prepare(ragged_table(n=14), 0, 0, 8).batch  # 16 rows: 2 weightless padding rows
    length = micro.lengths(b)
    rows = torch.arange(len(b))
    for world in (1, 2, 3):
        plans = [micro.plan(b, rows, r, world, budget=40) for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # every rank runs the same number of micro-batches
        real = sorted(int(i) for p in plans for m in p if not m.weightless for i in m.rows)
        assert real == list(range(14))  # each real sample exactly once; padding rows never
        for m in (m for p in plans for m in p):
            mb = micro.trim(b.rows(m.rows))
            assert len(m.rows) * mb.input_ids.shape[1] <= 40 or len(m.rows) == 1
            assert mb.input_ids.shape[1] == int(length[m.rows].max())  # cut to its own longest
            assert mb.mask.shape[1] == int((length[m.rows] - b.prompt_lens[m.rows]).max())
            if m.weightless:
                assert micro.take(b, alg.Targets(None, None, None, b.mask, None, b.real), m)[0].real.sum() == 0


@pytest.mark.parametrize("budget, aggregation", [(1, "seq_mean_token_mean"), (40, "seq_mean_token_mean"),
                                                 (10_000, "seq_mean_token_mean"), (40, "token_mean")])
def test_token_budget_micro_batches_give_the_fixed_count_gradient(tiny_models, budget, aggregation):
    """Any cut of a minibatch gives the same gradient: the weights are per sample (or per token with
    token_mean), normalised over the whole minibatch before the cut."""
    cfg = RLConfig(algorithm="grpo", minibatch_size=16, micro_batch_size=4, loss_aggregation=aggregation)
    b = prepare(ragged_table(), 0, 0, 16).batch
    model = policy(tiny_models)
    tg = targets(model, cfg, b)
    rows = torch.arange(len(b))
    norm = alg.loss_normaliser(cfg, b, tg.keep)
    want = grads_of(model, cfg, b, tg, list(rows.split(4)), norm)
    parts = [m for r in range(2) for m in micro.plan(b, rows, r, 2, budget)]
    got = grads_of(model, cfg, b, tg, parts, norm)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-6)


def test_local_learner_runs_both_knobs_to_the_default_step_and_reports_peak_memory(tiny_models):
    """PPO (policy, critic, KL reference; 2 minibatches, so the old-policy pass runs) on a ragged
    batch: with checkpointing and a 40-token budget the policy's grad forwards are cut to their
    own longest sample and its layers run twice (forward + recomputation), and the weights after
    the step are the default LocalLearner's (summation order only: 2e-5, as the 2-rank tests)."""
    from learner.local import LocalLearner

    runs = {}
    for name, knobs in {"default": {}, "knobs": dict(gradient_checkpointing=True,
                                                     max_tokens_per_micro_batch=40)}.items():
        local = LocalLearner(learner_cfg(**knobs), str(tiny_models["policy"]))
        seen = {"grad_widths": [], "rows": [], "forwards": 0, "mlp": 0}

        def forward(_, __, kw, seen=seen):
            seen["forwards"] += 1
            if torch.is_grad_enabled():
                seen["grad_widths"].append(kw["input_ids"].shape[1])
                seen["rows"].append(kw["input_ids"].shape[0])

        local.actor.register_forward_pre_hook(forward, with_kwargs=True)
        local.actor.model.layers[0].mlp.register_forward_pre_hook(
            lambda *_, seen=seen: seen.__setitem__("mlp", seen["mlp"] + 1))
        before = local.state_dict()
        metrics = local.train_step(ragged_table())
        runs[name] = before, local.state_dict(), metrics, seen
    before, want, want_metrics, plain = runs["default"]
    _, got, metrics, knobs = runs["knobs"]
    longest = int(micro.lengths(prepare(ragged_table(), 0, 0, 8).batch).max())
    assert set(plain["grad_widths"]) == {longest}  # fixed count: every micro-batch padded to the batch's longest
    assert plain["mlp"] == plain["forwards"]  # no recomputation without checkpointing
    assert len(set(knobs["grad_widths"])) > 2 and min(knobs["grad_widths"]) < longest // 2  # trimmed
    assert all(r * w <= 40 or r == 1 for r, w in zip(knobs["rows"], knobs["grad_widths"]))
    assert knobs["mlp"] == knobs["forwards"] + len(knobs["grad_widths"])  # each grad forward recomputed
    assert max((want[n] - before[n]).abs().max().item() for n in want) > 1e-4  # it did train
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=2e-5, msg=lambda m: f"{n}: {m}")
    for m in ("policy_loss", "value_loss", "kl", "entropy", "grad_norm"):
        assert metrics[m] == pytest.approx(want_metrics[m], abs=1e-5), m
    assert want_metrics["peak_mem_mb"] > 100 and metrics["peak_mem_mb"] > 100  # this process's resident peak, MiB
