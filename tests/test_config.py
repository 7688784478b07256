import subprocess
import sys

import pytest

from cluster.config import JobConfig, apply_override, load_config
from contract.config_base import ConfigError

BASE = {"model": {"policy": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"model_dir": "r"}}


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "model: {policy: m}\ndata: {prompts: p.jsonl}\nreward: {model_dir: r}\nrollout: {num_workers: 2}\n")
    cfg = load_config(p, ["rollout.num_workers=4", "learner.ppo.clip=0.1", "rollout.sampling.stop=[a, b]",
                          "loop.mode=async"])
    assert isinstance(cfg, JobConfig)
    assert cfg.rollout.num_workers == 4
    assert cfg.learner.ppo.clip == 0.1
    assert cfg.rollout.sampling.stop == ["a", "b"]
    assert cfg.loop.mode == "async"
    assert cfg.learner.zero_stage == 0  # defaults survive


@pytest.mark.parametrize("overrides, message", [
    (["rollout.num_workrs=2"], "rollout.num_workrs: unknown key"),
    (["learner.ppo.clip=-1"], "learner.ppo.clip: input should be greater than 0"),
    (["rollout.num_workers=two"], "rollout.num_workers: input should be a valid integer"),
    (["loop.mode=sideways"], "loop.mode: input should be 'sync' or 'async'"),
    (["learner.zero_stage=4"], "learner.zero_stage: input should be less than or equal to 3"),
    (["reward.model_dir=null"], "reward: value error, set reward.model_dir or at least one"),
    (["rollout.num_workers"], "expected key=value"),
    (["rollout.num_workers.x=1"], "rollout.num_workers is not a section"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, base=dict(BASE, rollout={"num_workers": 1}))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_required_section():
    with pytest.raises(ConfigError, match="model: field required"):
        load_config(None, [], base={"data": {"prompts": "p"}, "reward": {"model_dir": "r"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_override_creates_nested_sections():
    tree = {}
    apply_override(tree, "a.b.c=3")
    apply_override(tree, "a.b.d=x y")
    assert tree == {"a": {"b": {"c": 3, "d": "x y"}}}


def test_cli_typo_exits_nonzero_with_one_line(tmp_path):
    p = write(tmp_path, "model: {policy: m}\ndata: {prompts: p}\nreward: {model_dir: r}\nlearner: {ppo: {clipp: 0.2}}\n")
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"rlhf train: error: {p}: learner.ppo.clipp: unknown key"]


def test_every_subcommand_has_help():
    for cmd in ["train", "submit", "scale", "status", "stop", "train-rm", "make-tiny-models"]:
        r = subprocess.run([sys.executable, "-m", "cluster.cli", cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "usage: rlhf " + cmd in r.stdout
