import pytest
import yaml

from cluster.config import CONFIGS_DIR, JobConfig, apply_override, dump_config, load_config
from cluster.config_yaml import render
from contract.config_base import ConfigError, section_type
from reward_service.config import RewardModelTrainConfig
from support_jobs import rlhf

BASE = {"model": {"policy": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"model_dir": "r"}}


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def problems(overrides, base=BASE) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, base=base)
    assert str(e.value) == "\n".join(e.value.lines)
    return e.value.lines


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "model: {policy: m}\ndata: {prompts: p.jsonl}\nreward: {model_dir: r}\nrollout: {num_workers: 2}\n")
    cfg = load_config(p, ["rollout.num_workers=4", "learner.rl.clip=0.1", "rollout.sampling.stop=[a, b]",
                          "loop.mode=async"])
    assert isinstance(cfg, JobConfig)
    assert cfg.rollout.num_workers == 4
    assert cfg.learner.rl.clip == 0.1
    assert cfg.rollout.sampling.stop == ["a", "b"]
    assert cfg.loop.mode == "async"
    assert cfg.learner.zero_stage == 0  # defaults survive


@pytest.mark.parametrize("overrides, message", [
    (["rollout.num_workrs=2"], "rollout.num_workrs: unknown key (did you mean num_workers?)"),
    (["rollot.num_workers=2"], "rollot: unknown key (did you mean rollout?)"),
    (["learner.rl.clip=-1"], "learner.rl.clip: input should be greater than 0 (got -1)"),
    (["rollout.num_workers=two"], "rollout.num_workers: input should be a valid integer"),
    (["loop.mode=sideways"], "loop.mode: input should be 'sync', 'async' or 'inflight'"),
    (["learner.zero_stage=4"], "learner.zero_stage: input should be less than or equal to 3"),
    (["reward.model_dir=null"], "reward: set reward.model_dir or at least one reward.functions entry"),
    (["reward.functions=[{path: a.b:c, wieght: 2}]"], "reward.functions[0].wieght: unknown key (did you mean weight?)"),
    (["rollout.num_workers"], "expected key=value"),
    (["rollout.num_workers.x=1"], "rollout.num_workers is not a section"),
    (["model.tokenizer=t"], "model.tokenizer: unknown key"),  # never read: gone
])
def test_errors_name_the_key(overrides, message):
    lines = problems(overrides, dict(BASE, rollout={"num_workers": 1}))
    assert len(lines) == 1 and message in lines[0], lines


def test_every_mistake_is_listed_one_line_each():
    lines = problems(["learner.rl.clipp=0.1", "rollout.sampling.n=0", "loop.stesp=3"],
                     {"data": {"prompts": "p"}, "reward": {"model_dir": "r"}})
    assert lines == ["config: model: field required",
                     "config: rollout.sampling.n: input should be greater than or equal to 1 (got 0)",
                     "config: learner.rl.clipp: unknown key (did you mean clip?)",
                     "config: loop.stesp: unknown key (did you mean steps?)"]


def test_settings_that_contradict_each_other_are_all_listed():
    lines = problems(["learner.rl.algorithm=grpo", "reward.max_length=16", "rollout.sampling.max_new_tokens=16"])
    assert lines == [
        "config: rollout.sampling.n: grpo compares the samples of a prompt with each other and needs n >= 2 (got 1); "
        "with 1 every advantage is 0",
        "config: reward.max_length: 16 must exceed rollout.sampling.max_new_tokens (16), or the reward model scores "
        "responses cut short"]
    lines = problems(["rollout.sampling.max_new_tokens=512"])
    assert lines == ["config: rollout.sampling.max_new_tokens: 512 must be below rollout.engine.max_model_len (512): "
                     "prompt and response share the context, responses would be cut short silently"]


def test_the_loop_owns_the_learners_staleness():
    # one key, the loop's: the learner takes it as an argument (cluster/job/services.py), not as a copy
    assert problems(["learner.max_staleness=3"])[0].startswith("config: learner.max_staleness: unknown key")
    cfg = load_config(None, ["loop.mode=async"], base=BASE)
    assert "max_staleness" not in yaml.safe_load(dump_config(cfg))["learner"]


def test_inflight_updates_come_from_the_loop_mode_and_refuse_an_adapter_sync():
    assert problems(["rollout.inflight_updates=true"]) == [
        "config: rollout.inflight_updates: a job derives it from loop.mode (on for inflight; cluster/plan.py); "
        "remove it and set loop.mode: inflight"]
    assert problems(["loop.mode=inflight", "learner.lora.r=8", "learner.lora.sync=adapter"]) == [
        "config: loop.mode: inflight loads full weights mid-generation; a LoRA adapter sync would swap the adapter "
        "under requests in flight: set learner.lora.sync: merged"]
    assert load_config(None, ["loop.mode=inflight", "learner.lora.r=8", "learner.lora.sync=merged"],
                       base=BASE).loop.mode == "inflight"


def test_unfilled_placeholders_are_refused_by_key():
    assert problems([], dict(BASE, model={"policy": "<required>"},
                             reward={"functions": [{"path": "<fn>"}]})) == [
        "config: model.policy: fill in <required> (e.g. model.policy=VALUE)",
        "config: reward.functions[0].path: fill in <fn> (e.g. reward.functions[0].path=VALUE)"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_override_creates_nested_sections_and_leaves_the_base_alone():
    tree = {}
    apply_override(tree, "a.b.c=3")
    apply_override(tree, "a.b.d=x y")
    assert tree == {"a": {"b": {"c": 3, "d": "x y"}}}
    base = {"model": {"policy": "m"}, "data": {"prompts": "p"}, "reward": {"model_dir": "r"}}
    load_config(None, ["model.policy=other"], base=base)
    assert base["model"] == {"policy": "m"}


def test_an_unquoted_off_is_the_mode_off_not_false(tmp_path):
    """YAML 1.1 reads `off` as false; `learner.rl.rollout_correction.mode=off` (its documented value) must work."""
    base = {"model": {"policy": "m"}, "data": {"prompts": "p"}, "reward": {"model_dir": "r"}}
    assert load_config(None, ["learner.rl.rollout_correction.mode=off"], base=base).learner.rl.rollout_correction.mode \
        == "off"
    p = write(tmp_path, yaml.safe_dump(base) + "learner:\n  rl:\n    rollout_correction: {mode: off}\n")
    assert load_config(p).learner.rl.rollout_correction.mode == "off"


def fields(model, prefix=""):
    """(dotted key, field) of every key under `model`, list entries as `key[]`."""
    for name, f in model.model_fields.items():
        yield prefix + name, f
        sub = section_type(f.annotation)
        if sub is not None:
            yield from fields(sub, f"{prefix}{name}{'[]' if 'list' in str(f.annotation) else ''}.")


@pytest.mark.parametrize("model", [JobConfig, RewardModelTrainConfig])
def test_every_config_field_has_a_description(model):
    keys = [k for k, _ in fields(model)]
    undescribed = [k for k, f in fields(model) if not (f.description or "").strip()]
    assert undescribed == [], f"fields without a description: {', '.join(undescribed)}"
    assert len(keys) >= len(model.model_fields) > 0  # every section walked (learner.rl.* included)
    assert model is not JobConfig or "learner.rl.clip" in keys, keys


def filled(text: str, values: dict) -> dict:
    tree = yaml.safe_load(text)
    for key, value in values.items():
        apply_override(tree, f"{key}={value}")
    return tree


def keys(tree, prefix=""):
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict) and v:
            out |= keys(v, f"{prefix}{k}.")
    return out


def test_rlhf_config_is_the_whole_default_config_and_loads_back(tmp_path):
    r = rlhf("config")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith("# rlhf job config")
    assert "  num_workers: 1  # vLLM engines" in text  # `key: default  # description`
    with pytest.raises(ConfigError) as e:  # as printed: the three blanks are named
        load_config(write(tmp_path, text))
    assert [line.split(": ")[1] for line in e.value.lines] == ["model.policy", "data.prompts", "reward.model_dir"]
    need = {"model.policy": "m", "data.prompts": "p.jsonl", "reward.model_dir": "r"}
    cfg = load_config(None, [], base=filled(text, need))
    assert cfg == load_config(None, [], base=BASE)
    off = tuple(k + "." for k, f in fields(JobConfig) if section_type(f.annotation) and f.default is None)
    every = {k for k, _ in fields(JobConfig) if "[]" not in k and not k.startswith(off)}
    assert "  lora: null" in text and "  #     r: 16" in text  # an optional section: null, its keys commented
    assert keys(yaml.safe_load(text)) == every


def test_rlhf_config_section_and_train_rm():
    r = rlhf("config", "learner")
    assert r.returncode == 0, r.stderr
    tree = yaml.safe_load(r.stdout)
    assert list(tree) == ["learner"]
    assert JobConfig.model_fields["learner"].default_factory().model_dump() | tree["learner"] == \
        JobConfig.model_fields["learner"].default_factory().model_dump()
    assert yaml.safe_load(render(section="learner.rl")) == {"learner": {"rl": yaml.safe_load(
        render(section="learner"))["learner"]["rl"]}}
    assert yaml.safe_load(render(section="rollout.num_workers")) == {"rollout": {"num_workers": 1}}
    r = rlhf("config", "train-rm")
    need = {"base_model": "b", "data": "d", "output_dir": "o"}
    assert RewardModelTrainConfig.model_validate(filled(r.stdout, need)) == RewardModelTrainConfig(**need)
    assert "num_ranks" not in r.stdout
    r = rlhf("config", "lerner")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "rlhf config: error: config: the config has no key 'lerner' (did you mean learner?); keys: "
        + ", ".join(JobConfig.model_fields)]


def test_train_rm_has_no_num_ranks():
    with pytest.raises(ConfigError, match="num_ranks: unknown key"):
        load_config(None, ["num_ranks=2"], base={"base_model": "b", "data": "d", "output_dir": "o"},
                    model=RewardModelTrainConfig)


FILL = {"model.policy": "/m", "data.prompts": "/p.jsonl", "reward.model_dir": "/r",
        "base_model": "/b", "data": "/d.jsonl", "output_dir": "/o"}


@pytest.mark.parametrize("name", ["demo", "grpo_async", "gpu_cluster", "train_rm"])
def test_shipped_yamls_validate_once_their_blanks_are_filled(name):
    path = CONFIGS_DIR / f"{name}.yaml"
    model = RewardModelTrainConfig if name == "train_rm" else JobConfig
    with pytest.raises(ConfigError) as e:
        load_config(path, model=model)
    blanks = [line.split(": ")[1] for line in e.value.lines]
    assert all("fill in <" in line for line in e.value.lines) and blanks, e.value.lines
    assert "rlhf " in path.read_text().split("\n\n")[0]  # the header says how to run it
    cfg = load_config(path, [f"{k}={FILL[k]}" for k in blanks], model=model)
    if name == "grpo_async":
        assert (cfg.learner.rl.algorithm, cfg.loop.mode, cfg.rollout.sampling.n) == ("grpo", "async", 8)
        assert cfg.reward.model_dir is None and cfg.loop.max_staleness == 1
    if name == "gpu_cluster":
        assert (cfg.device, cfg.learner.num_ranks, cfg.rollout.num_workers) == ("cuda", 8, 4)


def test_cli_lists_every_mistake_without_traceback(tmp_path):
    p = write(tmp_path, "data: {prompts: p}\nreward: {model_dir: r}\nlearner: {rl: {clipp: 0.2}}\n")
    r = rlhf("train", str(p))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"rlhf train: error: {p}: model: field required",
                                     f"rlhf train: error: {p}: learner.rl.clipp: unknown key (did you mean clip?)"]


def test_every_subcommand_has_help():
    for cmd in ["train", "submit", "scale", "status", "stop", "train-rm", "make-tiny-models", "config",
                "import-gguf", "make-task"]:
        r = rlhf(cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert "usage: rlhf " + cmd in r.stdout
