"""LoRA (learner.lora, PEFT): only the adapters train, the frozen base is the KL reference (adapters
switched off, no second model). In one process (LocalLearner) and on 2 ZeRO-3 DeepSpeed ranks, which
end a PPO step with the same merged weights. Weight sync, both transports: with `sync: adapter` (the
default) the engines get the adapter alone and a real RolloutWorker serves it as a vLLM LoRA adapter,
sampling with the logprobs the learner's PEFT model gives, for a small fraction of the merged bytes;
with `sync: merged` a live vLLM engine's logprobs equal an HF model loaded with the published merged
weights. Both within test_learner_sync's 2e-5. A checkpoint holds the adapter and a merged HF export,
and loading it brings the trained adapter back onto the base model."""
import copy
import os
import uuid

import pytest
import ray
import torch

from contract.net import free_port
from contract.weights import GroupAddress
from learner import lora, models
from learner.config import LearnerConfig
from learner.local import LocalLearner
from support_learner import experience_table, learner_cfg, make_group
from support_learner import PROMPT, RESPONSE, TOLERANCE, engine_actor, hf_logprobs

LORA = {"r": 4, "alpha": 8.0}
MERGED = {**LORA, "sync": "merged"}


def adapted(tiny_models, critic: bool = False):
    cfg = LearnerConfig(lora=LORA)
    load = models.load_critic if critic else models.load_policy
    return load(cfg, str(tiny_models["policy"]))


@pytest.mark.parametrize("critic", [False, True])
def test_only_adapters_train_and_the_merge_is_peft_merge_and_unload(tiny_models, critic):
    model = adapted(tiny_models, critic)
    train = [n for n, p in model.named_parameters() if p.requires_grad]
    assert train and all(".lora_A." in n or ".lora_B." in n or (critic and ".score." in n) for n in train)
    assert len(models.trainable(model)) == len(train)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))  # a trained adapter
    named = {n: p.detach() for n, p in model.named_parameters()}
    merged = models.hf_state_dict(model, named)
    want = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    assert merged.keys() == want.keys() == {n for n, _ in models.hf_named_params(model)}
    for n in want:
        torch.testing.assert_close(merged[n], want[n].detach(), rtol=0, atol=1e-6, msg=n)


def test_reference_is_the_base_model_with_adapters_off(tiny_models):
    from transformers import AutoModelForCausalLM

    model = adapted(tiny_models)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.data.fill_(0.05)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    ids = torch.tensor([PROMPT + RESPONSE])
    with torch.no_grad():
        off, on, want = lora.AdapterOff(model, model)(input_ids=ids).logits, model(input_ids=ids).logits, \
            base(input_ids=ids).logits
    torch.testing.assert_close(off, want, rtol=0, atol=1e-6)
    assert (on - want).abs().max() > 1e-3  # the adapters are back on after the context


def test_a_target_module_the_model_lacks_is_one_line_naming_the_field(tiny_models):
    with pytest.raises(ValueError, match=r"^learner\.lora\.target_modules \['nope_proj'\]: Target modules") as e:
        models.load_policy(LearnerConfig(lora={"target_modules": ["nope_proj"]}), str(tiny_models["policy"]))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def local_step(tiny_models):
    """One PPO step (policy + critic, both LoRA; KL reference) of LocalLearner: (PEFT-named parameters
    before, after, merged weights before, after, metrics)."""
    local = LocalLearner(learner_cfg(lora=LORA), str(tiny_models["policy"]))
    named = lambda: {n: p.detach().clone() for n, p in local.actor.named_parameters()}  # noqa: E731
    before, merged_before = named(), local.state_dict()
    assert local.ref.peft_model is local.actor  # the reference is the policy itself, adapters off
    assert len(local.optimizers["actor"].param_groups[0]["params"]) == len(models.trainable(local.actor))
    metrics = local.train_step(experience_table(seed=3))
    return before, named(), merged_before, local.state_dict(), metrics


def test_local_lora_step_moves_only_the_adapters(local_step):
    before, after, merged_before, merged, metrics = local_step
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all(".lora_" in n for n in moved)  # base weights frozen
    assert any(".lora_B." in n for n in moved)  # B starts at 0 and trains
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0 at the start: policy == reference
    assert merged.keys() == merged_before.keys() and not any("lora" in n or "base_layer" in n for n in merged)
    assert max((merged[n] - merged_before[n]).abs().max().item() for n in merged) > 1e-4  # the merge moved


@pytest.fixture(scope="module")
def engine(tiny_models, ray_local):
    with engine_actor(tiny_models["policy"]) as actor:
        yield actor


def test_lora_ranks_publish_merged_weights_the_engine_scores_like_the_learner_and_checkpoint(
        tiny_models, engine, local_step, tmp_path):
    """2 ZeRO-3 ranks: the step equals LocalLearner's, only adapters are in the optimizers, the
    reference is the frozen base (KL 0 on the first step, not after), both syncs carry merged
    weights under the base names (sync: merged), a checkpoint holds a merged export and the adapter,
    and loads back."""
    policy = str(tiny_models["policy"])
    group = make_group(tiny_models, num_ranks=2, zero_stage=3, lora=MERGED)
    try:
        trainable = ray.get([h.__ray_call__.remote(lambda r: [sum(p.requires_grad for p in e.module.parameters())
                                                              for e in (r.actor, r.critic)])
                             for h in group._ranks.handles], timeout=60)
        n_lora = sum(".lora_" in n for n in local_step[0])
        assert trainable[0] == trainable[1] and n_lora == trainable[0][0] < trainable[0][1]  # critic: + its head
        manifest = group.weight_manifest()
        v0, ref0 = group.publish_object_store()
        base = dict(ray.get(ref0, timeout=60).tensors())
        assert [s.name for s in manifest.specs] == list(base) and "lora" not in " ".join(base)
        first = group.train_step(experience_table(seed=3))
        assert first["kl"] == pytest.approx(0.0, abs=1e-7)
        _, ref1 = group.publish_object_store()
        stepped = dict(ray.get(ref1, timeout=60).tensors())
        for n, t in local_step[3].items():  # the same merged weights as LocalLearner's step
            torch.testing.assert_close(stepped[n], t, rtol=0, atol=2e-5, msg=lambda m: f"{n}: {m}")

        # (a) broadcast over a side gloo group: the manifest's merged weights, base names
        addr = GroupAddress("127.0.0.1", free_port(), 2, f"lora-test-{uuid.uuid4().hex[:6]}", timeout_s=60)
        ray.get([group.join_weight_group(addr), engine.join.remote(addr, 1)], timeout=120)
        assert ray.get([group.broadcast_weights(), engine.receive.remote(manifest, 1)], timeout=120) == [1, 1]
        got = ray.get(engine.logprobs.remote(PROMPT, RESPONSE), timeout=120)
        assert got == pytest.approx(hf_logprobs(policy, ray.get(ref1, timeout=60)), abs=TOLERANCE)
        assert got != pytest.approx(hf_logprobs(policy, ray.get(ref0, timeout=60)), abs=10 * TOLERANCE)
        group.leave_weight_group()
        ray.get(engine.leave.remote(), timeout=60)

        # (b) the object store
        second = group.train_step(experience_table(seed=4, version=1))
        assert second["kl"] > 1e-6  # the reference stayed the frozen base while the policy moved
        version, ref2 = group.publish_object_store()
        packed = ray.get(ref2, timeout=60)
        assert packed.specs == manifest.specs  # merged weights under the base names, as announced
        merged = dict(packed.tensors())
        assert ray.get(engine.load_state_dict.remote([ref2], version), timeout=120) == version == 2
        got = ray.get(engine.logprobs.remote(PROMPT, RESPONSE), timeout=120)
        assert got == pytest.approx(hf_logprobs(policy, packed), abs=TOLERANCE)

        # checkpoint: DeepSpeed state without the frozen base, a merged HF export, the adapter alone
        group.save_checkpoint(str(tmp_path / "ckpt"))
        policy_dir = tmp_path / "ckpt" / "policy"
        assert {p.name for p in (policy_dir / "adapter").iterdir()} >= {"adapter_config.json",
                                                                        "adapter_model.safetensors"}
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        for n, t in exported.named_parameters():
            torch.testing.assert_close(t.detach(), merged[n], rtol=0, atol=0, msg=n)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                                            policy_dir / "adapter").merge_and_unload()
        for n, t in adapter.named_parameters():  # base + saved adapter = the export
            torch.testing.assert_close(t.detach(), merged[n], rtol=0, atol=1e-6, msg=n)
        group.train_step(experience_table(seed=5, version=2))
        group.load_checkpoint(str(tmp_path / "ckpt"))
        back = dict(ray.get(group.publish_object_store()[1], timeout=60).tensors())
        for n in merged:
            torch.testing.assert_close(back[n], merged[n], rtol=0, atol=0, msg=n)
    finally:
        group.shutdown()


def test_lora_with_checkpointing_recomputes_every_layer(tiny_models):
    model = models.load_policy(LearnerConfig(lora=LORA, gradient_checkpointing=True), str(tiny_models["policy"]))
    layers = model.get_base_model().model.layers
    calls = []
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model(input_ids=torch.tensor([PROMPT + RESPONSE])).logits.sum().backward()
    assert len(calls) == 2 * len(layers)  # forward + recomputation (see test_learner_memory)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def peft_logprobs(policy_dir, packed, rows, tmp_dir) -> tuple[list[list[float]], list[list[float]]]:
    """The learner's logprobs of each row's response with the published adapter (written as PEFT's
    adapter directory and loaded by PEFT itself) on, and off (the base model): log_softmax at T=1."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tmp_dir.mkdir()
    save_file({n: t.clone() for n, t in packed.tensors()}, str(tmp_dir / "adapter_model.safetensors"))
    (tmp_dir / "adapter_config.json").write_text(packed.adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
                                      tmp_dir).eval()

    def score(r):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0], -1)
        p = len(r["prompt_ids"])
        return [lp[p - 1 + i, t].item() for i, t in enumerate(r["response_ids"])]

    on = [score(r) for r in rows]
    with model.disable_adapter():
        off = [score(r) for r in rows]
    return on, off


def test_lora_adapter_sync_sends_only_the_adapter_and_the_worker_samples_like_the_learner(
        tiny_models, ray_local, local_step, tmp_path):
    """sync: adapter (the default). 2 ZeRO-3 ranks publish the adapter alone (PEFT names, its config),
    a fraction of the merged bytes; a real RolloutWorker (vLLM runtime LoRA, started with the rank the
    job config derives) serves it after an object-store and then a broadcast sync, and its sampled
    tokens' logprobs equal the learner's PEFT model's; only the newest adapter stays on its disk."""
    import json

    from actors.config import EngineConfig, SamplingConfig
    from actors.worker import RolloutWorker
    from support_learner import CPU
    from support_rollout import prompts, rollout_cfg

    policy = str(tiny_models["policy"])
    cfg = rollout_cfg(engine=EngineConfig(max_model_len=128, kv_cache_bytes=16 << 20, lora_rank=LORA["r"]))
    worker = RolloutWorker.options(num_cpus=1, runtime_env={"env_vars": CPU.actor_env(1)}).remote(
        "w-lora", policy, cfg, "cpu")
    group = make_group(tiny_models, num_ranks=2, zero_stage=3, lora=LORA)
    sampling = SamplingConfig(max_new_tokens=8, n=2, seed=5, temperature=1.0)

    def sample_and_compare(packed, name):
        """The worker's samples; their logprobs are the learner's with the adapter on, not the base's."""
        rows = ray.get(worker.generate.remote(prompts(3), sampling), timeout=120).to_pylist()
        on, off = peft_logprobs(policy, packed, rows, tmp_path / name)
        gap = lambda want: max(abs(a - b) for r, w in zip(rows, want) for a, b in zip(r["logprobs"], w))  # noqa: E731
        assert gap(on) < TOLERANCE and gap(off) > 10 * TOLERANCE, (gap(on), gap(off))
        return rows

    try:
        manifest = group.weight_manifest()
        assert manifest.specs and all(".lora_A.weight" in s.name or ".lora_B.weight" in s.name for s in manifest.specs)
        assert json.loads(manifest.adapter)["r"] == LORA["r"] and manifest.aliases == ()
        merged_bytes = sum(t.numel() * t.element_size() for t in local_step[3].values())
        n_lora = sum(".lora_" in n for n in local_step[0])
        adapter_bytes = sum(t.numel() * t.element_size() for n, t in local_step[0].items() if ".lora_" in n)
        assert len(manifest.specs) == n_lora and manifest.total_bytes == adapter_bytes < merged_bytes / 10

        # (a) the object store, after one step
        group.train_step(experience_table(seed=3))
        v1, ref1 = group.publish_object_store()
        packed1 = ray.get(ref1, timeout=60)
        assert packed1.specs == manifest.specs and packed1.adapter == manifest.adapter
        assert packed1.total_bytes == manifest.total_bytes
        assert ray.get(worker.update_weights.remote(v1, ref1), timeout=120) == v1 == 1
        sample_and_compare(packed1, "v1")

        # (b) broadcast over a side gloo group, after a second step
        group.train_step(experience_table(seed=4, version=1))
        addr = GroupAddress("127.0.0.1", free_port(), 2, f"lora-test-{uuid.uuid4().hex[:6]}", timeout_s=60)
        ray.get([group.join_weight_group(addr), worker.join_weight_group.remote(addr, 1)], timeout=120)
        assert ray.get([group.broadcast_weights(), worker.receive_weights.remote(2, manifest)], timeout=120) == [2, 2]
        packed2 = ray.get(group.publish_object_store()[1], timeout=60)  # what was broadcast, to score with
        rows2 = sample_and_compare(packed2, "v2")
        assert [r["policy_version"] for r in rows2] == [2] * len(rows2)
        on_disk = ray.get(worker.__ray_call__.remote(lambda w: sorted(os.listdir(w.engine.adapter._root.name))),
                          timeout=60)
        assert on_disk == ["v2"]  # the previous version's adapter directory is gone
    finally:
        group.shutdown()
        ray.kill(worker)


@pytest.mark.slow
def test_a_lora_job_samples_with_the_adapter_the_learner_trains(tiny_models, ray_local, tmp_path):
    """A whole sync-mode job with learner.lora (adapter sync, the engines given LoRA room by the job
    config alone): after every sync the worker's logprobs of its samples equal the learner's old-policy
    logprobs (logprob_gap), while the policy moves away from the frozen base (KL to the reference), and
    each sync moves the adapter's bytes."""
    import json
    import sys

    from cluster.config import load_config
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.job.services import start_services, stop_services
    from cluster.outputs.run_dir import RunDir
    from cluster.plan import make_job_plan
    from contract.datasets import PromptIterator, load_prompts
    from contract.devices import DeviceProfile
    from pathlib import Path

    here = Path(__file__).parent
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"red cat {i}"}) + "\n" for i in range(8)))
    steps = 3
    cfg = load_config(None, [], base={
        "name": "lora-job", "model": {"policy": str(tiny_models["policy"])},
        "data": {"prompts": str(prompts), "prompts_per_step": 4},
        "rollout": {"num_workers": 1, "sampling": {"n": 2, "max_new_tokens": 6, "temperature": 1.0}},
        "reward": {"functions": [{"path": "support_rewards:colour_only"}], "python_path": [str(here)],
                   "http_port": free_port(), "max_retries": 1},
        "learner": {"num_ranks": 1, "lr": 5e-2, "lora": LORA,
                    "rl": {"algorithm": "grpo", "kl_coef": 0.01, "minibatch_size": 8, "micro_batch_size": 8}},
        "loop": {"steps": steps, "mode": "sync"},
    })
    assert make_job_plan(cfg).rollout.engine.lora_rank == LORA["r"]
    sys.path.insert(0, str(here))
    run = RunDir(tmp_path / "run").create("")
    services = start_services(cfg, DeviceProfile("cpu"), str(tmp_path / "store"), log=lambda m: None)
    try:
        TrainingLoop(cfg, run, services, PromptIterator(load_prompts(prompts)), LoopState(), log=lambda m: None).run_loop()
        manifest = services.learner.weight_manifest()
    finally:
        stop_services(services)
        sys.path.remove(str(here))
    rows = [r for r in run.read_metrics() if "train_s" in r]
    assert [r["step"] for r in rows] == list(range(steps))
    assert manifest.adapter and all(r["sync_bytes"] == manifest.total_bytes for r in rows)
    assert all(r["staleness_max"] == 0 and r["logprob_gap"] < 1e-4 for r in rows)
    assert rows[-1]["kl"] > 10 * rows[-1]["logprob_gap"]  # the adapter the engine serves has moved off the base
