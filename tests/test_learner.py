"""LearnerGroup on real DeepSpeed ranks (Ray actors, gloo) with the tiny model: input checks,
ZeRO-2/3 on 2 ranks vs ZeRO-0 on 1 rank, checkpoint resume, a dead rank, and PPO learning a toy task."""
import math
import uuid

import pyarrow as pa
import pytest
import torch

from contract.experience import ExperienceError
from learner.batch import prepare
from learner.config import RLConfig
from learner.group import LearnerGroup
from support_learner import CPU, experience_table, learner_cfg, make_group, params

# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.drop_columns(["logprobs"]), r"missing column\(s\) \['logprobs'\]"),
    (lambda t: t.set_column(t.schema.get_field_index("logprobs"), "logprobs",
                            pa.array([[-1.0]] * t.num_rows, pa.list_(pa.float32()))), r"len\(logprobs\) != len\(response_ids\)"),
    (lambda t: t.set_column(t.schema.get_field_index("reward"), "reward",
                            pa.array([math.nan] + [1.0] * (t.num_rows - 1), pa.float32())), r"'reward' is NaN"),
    (lambda t: t.set_column(t.schema.get_field_index("policy_version"), "policy_version",
                            pa.array([3] * t.num_rows, pa.int64())), r"'policy_version' has 3, older than allowed"),
    (lambda t: t.set_column(t.schema.get_field_index("reward_valid"), "reward_valid",
                            pa.array([False] * t.num_rows)), r"no row with reward_valid=True"),
])
def test_bad_experience_is_rejected_with_the_column_named(bad, message):
    with pytest.raises(ExperienceError, match=message):
        prepare(bad(experience_table(version=5)), version=6, max_staleness=1, multiple_of=8)


def test_invalid_rewards_are_dropped_and_batch_padded_weightless():
    valid = [i % 5 != 0 for i in range(16)]  # 4 invalid rows
    prep = prepare(experience_table(reward_valid=valid), version=0, max_staleness=0, multiple_of=8)
    assert (prep.num_samples, prep.num_dropped, len(prep.batch)) == (12, 4, 16)
    assert prep.batch.real.tolist() == [1.0] * 12 + [0.0] * 4
    assert prep.batch.mask[12:].sum() == 0 and prep.batch.mask[:12].sum() > 0
    # prompt + response are concatenated; the response tokens sit right after the prompt
    b = prep.batch
    for i in range(12):
        p = int(b.prompt_lens[i])
        n = int(b.mask[i].sum())
        assert torch.equal(b.input_ids[i, p:p + n], b.response_ids[i, :n])


def test_one_step_update_reuses_its_own_forward_as_the_old_policy(tiny_models):
    """When an update is one optimizer step (one epoch, one minibatch) and the KL does not shape the
    reward, the learner skips the no-grad old-logprob pass: the loss, its gradient and the metrics
    must equal those computed with that pass."""
    from transformers import AutoModelForCausalLM

    from learner import algorithm as alg

    cfg = RLConfig(algorithm="grpo", kl_coef=0.05, minibatch_size=16, micro_batch_size=16)
    assert alg.old_is_first_forward(cfg, 16)
    assert not alg.old_is_first_forward(cfg, 32)  # two minibatches: the second needs the old policy
    assert not alg.old_is_first_forward(cfg.model_copy(update={"epochs": 2}), 16)
    assert not alg.old_is_first_forward(cfg.model_copy(update={"algorithm": "ppo"}), 16)  # KL-shaped reward
    assert alg.old_is_first_forward(cfg.model_copy(update={"algorithm": "ppo", "kl_coef": 0.0}), 16)

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    b = prepare(experience_table(n=16), 0, 0, 16).batch
    ref = alg.response_logprobs(model, b) + 0.1 * torch.randn(b.mask.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for old in (alg.response_logprobs(model, b), None):
        model.zero_grad()
        tg = alg.compute_targets(cfg, b, old, ref, None)
        loss, metrics = alg.actor_loss(cfg, model, b, tg, alg.sample_weights(b, 16.0))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], metrics))
    (loss_a, grads_a, m_a), (loss_b, grads_b, m_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-7)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-7)
    for name in m_a:
        torch.testing.assert_close(m_b[name], m_a[name], rtol=0, atol=1e-7, msg=name)
    assert m_b["kl"].sum() > 0 and m_b["logprob_gap"].sum() > 0  # measured, not defaulted


def test_response_logprobs_and_entropy_are_each_rows_own_next_token_scores(tiny_models):
    """Prompts and responses of different lengths in one right-padded batch: the LM head runs on a
    shared tail of positions, so each row's alignment must still land on its own response tokens."""
    from transformers import AutoModelForCausalLM

    from learner import algorithm as alg

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    b = prepare(experience_table(n=10), 0, 0, 1).batch
    assert len(set(b.prompt_lens.tolist())) > 1 and len(set(b.mask.sum(1).tolist())) > 1
    with torch.no_grad():
        logp, ent = alg.policy_logprobs_and_entropy(model, b)
        for i in range(len(b)):
            p, r = int(b.prompt_lens[i]), int(b.mask[i].sum())
            ids = b.input_ids[i, :p + r].unsqueeze(0)
            all_logp = torch.log_softmax(model(input_ids=ids).logits[0, p - 1:p + r - 1], -1)
            want_logp = all_logp.gather(-1, ids[0, p:].unsqueeze(-1)).squeeze(-1)
            want_ent = -(all_logp.exp() * all_logp).sum(-1)
            torch.testing.assert_close(logp[i, :r], want_logp, rtol=0, atol=1e-5)
            torch.testing.assert_close(ent[i, :r], want_ent, rtol=0, atol=1e-5)


# ---- DeepSpeed ranks --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 0.0, 2e-5), ("bfloat16", 2 ** -7, 2.5e-3)])
def test_two_ranks_zero2_and_zero3_match_one_rank_zero0(tiny_models, ray_local, dtype, rtol, atol):
    """Same global batch, one PPO step (policy + critic + KL to the reference), lr 1e-3.
    fp32: every parameter within 2e-5 absolute (measured ~1e-6: reduction order only).
    bf16: the forward itself rounds differently with other micro-batch shapes, so where a gradient
    is ~0 Adam's first step (+-lr) may flip sign: every parameter within 2 lr + 1 bf16 ULP, and
    in sum the runs differ by < 50% of the update itself (measured 0.29; unrelated sign-updates: ~1)."""
    table = experience_table(n=14)  # 14 real rows -> 2 padding rows: exercises the sample weights
    results = {}
    for ranks, stage in [(1, 0), (2, 2), (2, 3)]:
        group = make_group(tiny_models, num_ranks=ranks, zero_stage=stage, dtype=dtype)
        try:
            assert {s.dtype for s in group.weight_manifest().specs} == {dtype}
            before = params(group)
            metrics = group.train_step(table)
            results[(ranks, stage)] = (params(group), metrics)
        finally:
            group.shutdown()
    ref_params, ref_metrics = results[(1, 0)]
    assert ref_metrics["num_samples"] == 14 and ref_metrics["policy_version"] == 1
    assert max((ref_params[n] - before[n]).abs().max().item() for n in before) > 1e-4  # it did train
    for key in [(2, 2), (2, 3)]:
        got, metrics = results[key]
        assert got.keys() == ref_params.keys()
        for n in got:
            torch.testing.assert_close(got[n], ref_params[n], rtol=rtol, atol=atol, msg=lambda m: f"{key} {n}: {m}")
        diff = sum((got[n].float() - ref_params[n].float()).abs().sum() for n in got)
        update = sum((ref_params[n].float() - before[n].float()).abs().sum() for n in got)
        assert diff < 0.5 * update, f"{key}: runs differ by {diff / update:.2f} of the update"
        for m in ("policy_loss", "value_loss", "kl", "entropy", "logprob_gap"):
            assert metrics[m] == pytest.approx(ref_metrics[m], abs=1e-5 if dtype == "float32" else 2e-2), m


def test_checkpoint_save_load_step_equals_uninterrupted(tiny_models, ray_local, tmp_path):
    t1, t2 = experience_table(seed=1), experience_table(seed=2, version=1)
    group = make_group(tiny_models, num_ranks=2, zero_stage=2)
    try:
        group.train_step(t1)
        group.save_checkpoint(str(tmp_path / "ckpt"))
        group.save_checkpoint(str(tmp_path / "ckpt"))  # overwriting an existing checkpoint is atomic too
        straight = group.train_step(t2)
        want = params(group)
    finally:
        group.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy")
    assert (tmp_path / "ckpt" / "critic" / "model.safetensors").is_file()
    resumed = make_group(tiny_models, num_ranks=2, zero_stage=2)
    try:
        assert params(resumed)["lm_head.weight"].sub(exported.lm_head.weight.detach()).abs().max() > 0
        resumed.load_checkpoint(str(tmp_path / "ckpt"))
        assert resumed.version == 1
        torch.testing.assert_close(params(resumed)["lm_head.weight"], exported.lm_head.weight.detach())
        again = resumed.train_step(t2)
        got = params(resumed)
    finally:
        resumed.shutdown()
    assert again["policy_version"] == straight["policy_version"] == 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-7, rtol=0)
    assert again["value_loss"] == pytest.approx(straight["value_loss"], abs=1e-7)  # critic + its Adam resumed


def test_a_dead_rank_is_a_clear_error_not_a_hang(tiny_models, ray_local):
    import ray

    group = make_group(tiny_models, num_ranks=2, zero_stage=2)
    try:
        with pytest.raises(ExperienceError):  # validated in the controller: the ranks never see it
            group.train_step(experience_table(version=1))
        ray.kill(ray.get_actor("learner-rank-1", namespace=group._namespace))
        with pytest.raises(RuntimeError, match=r"^learner train_step: learner rank 1 died \(\w+\)$"):
            group.train_step(experience_table())
        assert group.version == 0
    finally:
        group.shutdown()


# ---- learning ---------------------------------------------------------------------------------


def sample(model, prompts: list[list[int]], n: int, new_tokens: int, seed: int) -> tuple[list, list]:
    """n samples per prompt from an HF policy (temperature 1), with their token log-probs."""
    torch.manual_seed(seed)
    ids = torch.tensor([p for p in prompts for _ in range(n)])
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=3)
        logp = torch.log_softmax(model(out).logits[:, ids.shape[1] - 1:-1].float(), -1)
    resp = out[:, ids.shape[1]:]
    return resp.tolist(), logp.gather(-1, resp.unsqueeze(-1)).squeeze(-1).tolist()


@pytest.mark.slow
def test_ppo_improves_reward_on_a_toy_task(tiny_models, ray_local):
    """Reward = fraction of response tokens with an even id (~0.5 at random init). 12 PPO steps
    (critic, GAE, KL penalty) must raise it: mean of the last 3 steps > first 3 + 0.25 (measured 0.52 -> 0.98)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    cfg = learner_cfg(num_ranks=2, zero_stage=2)
    cfg.lr, cfg.critic_lr, cfg.rl.epochs, cfg.rl.kl_coef = 1e-2, 1e-2, 2, 0.01
    group = LearnerGroup(cfg, str(tiny_models["policy"]), CPU, namespace=f"learner-{uuid.uuid4().hex[:6]}")
    prompts = [[5 + i, 40 + 3 * i, 77 + i] for i in range(8)]
    rewards = []
    try:
        for step in range(12):
            model.load_state_dict(params(group))
            responses, logprobs = sample(model, prompts, n=4, new_tokens=6, seed=step)
            scores = [sum(t % 2 == 0 for t in r) / len(r) for r in responses]
            rewards.append(sum(scores) / len(scores))
            table = experience_table(n=32, version=group.version, prompt_ids=[p for p in prompts for _ in range(4)],
                                     response_ids=responses, logprobs=logprobs, reward=scores)
            metrics = group.train_step(table)
            assert metrics["logprob_gap"] < 1e-4  # the learner and the sampler hold the same weights
    finally:
        group.shutdown()
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards
