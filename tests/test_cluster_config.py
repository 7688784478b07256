"""The demo's shipped config, and `rlhf train`'s preflight: what can be checked before anything
starts is, each problem one line naming the key, all of them listed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.launch import preflight as pf
from cluster.plan import make_job_plan
from cluster.launch.train import DEMO_YAML, demo_config, resolve_job
from contract.config_base import ConfigError
from contract.devices import DeviceProfile

CPU, CUDA = DeviceProfile("cpu"), DeviceProfile("cuda")


def stub_build(calls: list):
    def build(work: Path, max_new_tokens: int = 16, steps: int = 60) -> dict:
        calls.append(max_new_tokens)
        return {"model": {"policy": str(work / "models/policy")}, "data": {"prompts": str(work / "data/p.jsonl")},
                "reward": {"model_dir": str(work / "reward_model")}}
    return build


def test_the_demo_runs_its_shipped_yaml(tmp_path, monkeypatch):
    """`rlhf train` with no config is cluster/configs/demo.yaml plus the paths build_demo makes."""
    import cluster.demo.task as task

    monkeypatch.setattr(task, "make_tiny_models", lambda d: {"policy": d / "policy", "reward": d / "reward"})
    (tmp_path / "demo/reward_model").mkdir(parents=True)
    (tmp_path / "demo/reward_model/config.json").write_text("{}")  # trained already: not retrained
    (tmp_path / "demo/sft_model").mkdir(parents=True)
    (tmp_path / "demo/sft_model/config.json").write_text("{}")  # fine-tuned already
    (tmp_path / "demo/data").mkdir(parents=True)
    (tmp_path / "demo/data/preferences.jsonl").write_text("")
    tree = task.build_demo(tmp_path / "demo")
    cfg = demo_config(tmp_path / "demo", [], build=lambda work, max_new_tokens: tree)
    assert cfg == load_config(None, [], base=tree)  # the YAML is the demo's whole config
    assert cfg.model.policy == str(tmp_path / "demo/sft_model")  # PPO starts from the SFT model
    assert task.build_demo(tmp_path / "demo", sft=False)["model"]["policy"] == str(tmp_path / "demo/models/policy")


def test_demo_demonstrations_are_the_preferred_responses_with_gold_at_least_half():
    from cluster.demo.task import demonstrations

    pairs = [{"prompt": "p", "chosen": "red blue cat", "rejected": "cat dog"},
             {"prompt": "q", "chosen": "red dog cat mat", "rejected": "dog"}]
    assert demonstrations(pairs) == [{"prompt": "p", "response": "red blue cat"}]


def test_overrides_work_on_the_demo_and_are_checked_before_it_is_built(tmp_path, monkeypatch):
    import cluster.demo.task as task

    calls = []
    monkeypatch.setattr(task, "build_demo", stub_build(calls))
    cfg, root = resolve_job("loop.steps=200", ["rollout.sampling.max_new_tokens=24"], None, str(tmp_path / "run"))
    assert (cfg.name, cfg.loop.steps, cfg.rollout.num_workers) == ("demo", 200, 1)
    assert calls == [24]  # the reward model's pairs are as long as the responses
    assert cfg.data.prompts == str(tmp_path / "run/demo/data/p.jsonl") and root == tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        resolve_job("loop.stepz=200", [], None, str(tmp_path / "run2"))
    assert e.value.lines == ["demo: loop.stepz: unknown key (did you mean steps?)"]
    assert calls == [24]  # nothing built for a typo
    assert "<built by the demo>" in DEMO_YAML.read_text()


@pytest.fixture
def job(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"red cat {i}"}) + "\n" for i in range(4)))

    def make(*overrides, **sections):
        base = {"model": {"policy": str(tiny_models["policy"])}, "data": {"prompts": str(prompts)},
                "reward": {"model_dir": str(tiny_models["reward"])}, **sections}
        return load_config(None, list(overrides), base=base)
    return make


def check(cfg, device=CPU, embedded=True) -> list[str]:
    with pytest.raises(ConfigError) as e:
        pf.preflight(cfg, device, embedded)
    return e.value.lines


def test_a_good_job_passes(job):
    pf.preflight(job(), CPU, embedded=True)


def test_the_engines_get_room_for_the_adapter_an_adapter_sync_brings(job):
    """learner.lora with sync adapter (the default) gives the engines LoRA of rank r in the job's plan:
    no second setting to keep in step, and no validator rewriting a user key; merged sync or no LoRA
    leaves the engines without LoRA; a job config that sets the engine's rank itself is refused."""
    assert make_job_plan(job()).rollout.engine.lora_rank == 0
    cfg = job("learner.lora.r=8")
    assert make_job_plan(cfg).rollout.engine.lora_rank == 8
    assert cfg.rollout.engine.lora_rank == 0  # the user's config is left as written
    assert make_job_plan(job("learner.lora.r=8", "learner.lora.sync=merged")).rollout.engine.lora_rank == 0
    with pytest.raises(ConfigError, match=r"rollout.engine.lora_rank: a job derives it from learner.lora "):
        job("learner.lora.r=8", "rollout.engine.lora_rank=8")
    pf.preflight(job("learner.lora.r=8"), CPU, embedded=True)
    assert check(job("learner.lora.r=1024")) == [
        "learner.lora.r: 1024 is too large for an adapter sync (vLLM serves LoRA ranks up to 512 (got 1024); set "
        "learner.lora.sync=merged to send merged weights instead)"]
    pf.preflight(job("learner.lora.r=1024", "learner.lora.sync=merged"), CPU, embedded=True)


def test_models_of_the_wrong_kind_are_named(job, tiny_models):
    lines = check(job(f"model.policy={tiny_models['reward']}", f"reward.model_dir={tiny_models['policy']}"))
    assert lines == [
        f"model.policy: {tiny_models['reward']} is a LlamaForSequenceClassification, not a causal LM "
        f"(*ForCausalLM); a reward model belongs in reward.model_dir",
        f"reward.model_dir: {tiny_models['policy']} is a LlamaForCausalLM, not a reward model "
        f"(*ForSequenceClassification with one output; `rlhf train-rm` makes one)"]


def test_two_outputs_and_missing_dirs(job, tiny_models, tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    hf = json.loads((tiny_models["reward"] / "config.json").read_text())
    (two / "config.json").write_text(json.dumps(hf | {"id2label": {"0": "a", "1": "b"}}))
    lines = check(job(f"reward.model_dir={two}", f"learner.critic_model={tmp_path / 'nope'}"))
    assert lines == [f"reward.model_dir: {two} has 2 outputs (id2label); a reward model has exactly one (num_labels=1)",
                     f"learner.critic_model: model directory {tmp_path / 'nope'} does not exist; expected a "
                     f"Hugging Face model directory"]


def test_lengths_that_cannot_fit(job, tmp_path):
    # tiny models: 512 positions; the prompts are 4-5 tokens
    assert check(job("rollout.engine.max_model_len=1024", "reward.max_length=600")) == [
        "rollout.engine.max_model_len: 1024 exceeds the 512 positions of model.policy (config.json "
        "max_position_embeddings)",
        "reward.max_length: 600 exceeds the 512 positions of reward.model_dir (config.json max_position_embeddings)"]
    lines = check(job("rollout.engine.max_model_len=64", "rollout.sampling.max_new_tokens=62"))
    assert len(lines) == 1 and lines[0].startswith("rollout.engine.max_model_len: 64 is too short for data.prompts: "
                                                   "its longest prompt has ")
    longest = int(lines[0].split("has ")[1].split(" tokens")[0])
    assert 3 <= longest <= 8
    pf.preflight(job("rollout.engine.max_model_len=64", f"rollout.sampling.max_new_tokens={64 - longest}"), CPU, True)


def test_functions_and_data_are_checked_up_front(job, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    lines = check(job("loop.gold_function=reward_service.functions:colour_fractoin",
                      "reward.functions=[{path: no_such_pkg.rewards:f}]", f"data.prompts={empty}"))
    assert lines == [
        f"data.prompts: {empty}: file is empty",
        "reward.functions[0].path: cannot import module 'no_such_pkg.rewards' for 'no_such_pkg.rewards:f' "
        "(No module named 'no_such_pkg')",
        "loop.gold_function: 'reward_service.functions:colour_fractoin' is not a callable in module "
        "'reward_service.functions'"]


ROLES = [("learner.num_ranks", 2, {"CPU": 1.0, "GPU": 1.0}), ("rollout.num_workers", 6, {"CPU": 2.0, "GPU": 1.0}),
         ("reward.num_replicas", 1, {"CPU": 1.0})]


def test_resources_the_cluster_cannot_offer():
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert pf.check_resources(ROLES, {"CPU": 32.0, "GPU": 8.0}, "the cluster", nodes) == []
    assert pf.check_resources(ROLES, {"CPU": 32.0, "GPU": 6.0}, "the cluster", nodes) == [
        "rollout.num_workers=6: the job needs 8 GPU (learner 2 x 1 + rollout 6 x 1) but the cluster has 6"]
    big = [("rollout.num_workers", 1, {"CPU": 1.0, "GPU": 8.0})]
    assert pf.check_resources(big, {"CPU": 32.0, "GPU": 8.0}, "the cluster", nodes) == [
        "rollout: one unit needs {CPU: 1, GPU: 8} on a single node, and no node of the cluster has that much"]


def test_what_the_job_asks_per_role(job):
    cfg = job("rollout.num_workers=3", "rollout.gpus_per_worker=0.5", "reward.num_replicas=2")
    assert pf.demand(cfg, make_job_plan(cfg), CPU) == [("learner.num_ranks", 1, {"CPU": 1.0}), ("rollout.num_workers", 3, {"CPU": 1.0}),
                                   ("reward.num_replicas", 2, {"CPU": 1.0})]
    assert pf.demand(cfg, make_job_plan(cfg), CUDA)[1] == ("rollout.num_workers", 3, {"CPU": 1.0, "GPU": 0.5})


def test_an_embedded_cluster_too_small(job, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check(job("ray.num_cpus=2", "rollout.num_workers=3")) == [
        "ray.num_cpus=2: the job needs 5 CPU (learner 1 x 1 + rollout 3 x 1 + reward 1 x 1) but the embedded "
        "cluster has 2"]
    pf.preflight(job("ray.num_cpus=2", "rollout.num_workers=3"), CPU, embedded=False)  # attached: checked there
    lines = check(job(), CUDA)  # this machine has one GPU
    assert lines == ["learner.num_ranks=1: the job needs 2 GPU (learner 1 x 1 + rollout 1 x 1) but this machine "
                     "has 1"]
    monkeypatch.setattr(pf, "demand", lambda cfg, plan, device: [("rollout.num_workers", 1, {"CPU": 1.0, "rollout": 1.0})])
    assert check(job()) == ["rollout.resources: rollout is a custom resource and an embedded cluster has none; "
                            "attach to a cluster whose nodes offer it (--address / ray.address) or remove the key"]


def test_an_attached_cluster_is_compared_once_connected(job, ray_local):
    def check_cluster(cfg):
        pf.check_cluster(cfg, make_job_plan(cfg), CPU)

    check_cluster(job())
    with pytest.raises(ConfigError) as e:
        check_cluster(job("rollout.num_workers=40"))
    assert e.value.lines[0].startswith("rollout.num_workers=40: the job needs 42 CPU (learner 1 x 1 + rollout "
                                       "40 x 1 + reward 1 x 1) but the Ray cluster (1 node(s)")
    check_cluster(job("rollout.num_workers=40", "ray.check_resources=false"))


def test_cli_refuses_in_one_line_per_problem_and_writes_nothing(job, tiny_models, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"model": {"policy": str(tiny_models["reward"])}, "data": {"prompts": "nope.jsonl"},
                                "reward": {"model_dir": str(tiny_models["reward"])}, "run_dir": str(tmp_path / "run")}))
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"rlhf train: error: model.policy: {tiny_models['reward']} is a LlamaForSequenceClassification, not a causal "
        f"LM (*ForCausalLM); a reward model belongs in reward.model_dir",
        "rlhf train: error: data.prompts: nope.jsonl: file not found"]
    assert not (tmp_path / "run").exists()
