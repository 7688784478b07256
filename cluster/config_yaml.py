"""`rlhf config [SECTION]`: the default config as commented YAML, rendered from the models.

Every key is walked from `model_fields` (nothing is listed by hand, so the text cannot drift from
what is validated): `key: default  # description`, a long description wrapped in comment lines
above its key, sections nested. A required value with no default is written as a placeholder
(`<required>`), which `load_config` refuses until it is filled in.
"""
from __future__ import annotations

import textwrap
import typing

import yaml

from cluster.config import JobConfig
from contract.config_base import ConfigError, Section, did_you_mean, section_type
from cluster.launch.sft import SFTJobConfig
from reward_service.config import RewardModelTrainConfig

WIDTH = 110
REQUIRED = "<required>"
HEADERS = {
    JobConfig: ("rlhf job config: every key with its default and what it is (printed by `rlhf config`).\n"
                "Save it, fill in the <...> values, delete the keys you keep at their default, and run:\n"
                "  rlhf train job.yaml [key=value ...]\n"
                "Examples: cluster/configs/*.yaml (demo, grpo_async, gpu_cluster)."),
    RewardModelTrainConfig: ("rlhf train-rm config: every key with its default (printed by `rlhf config train-rm`).\n"
                             "Fill in the <...> values and run: rlhf train-rm rm.yaml [key=value ...]\n"
                             "Example: cluster/configs/train_rm.yaml."),
    SFTJobConfig: ("rlhf train-sft config: every key with its default (printed by `rlhf config train-sft`).\n"
                   "Fill in the <...> values and run: rlhf train-sft sft.yaml [key=value ...]\n"
                   "Example: cluster/configs/train_sft.yaml."),
}


def _scalar(value) -> str:
    """One YAML flow value that loads back to `value`."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _is_list_of_sections(annotation) -> bool:
    return typing.get_origin(annotation) is list and section_type(annotation) is not None


def _comment(text: str, pad: str) -> list[str]:
    return [f"{pad}# {line}" for line in textwrap.wrap(text, WIDTH - len(pad) - 2, break_on_hyphens=False)]


def _keyed(pad: str, head: str, desc: str) -> list[str]:
    """`head  # desc` when it fits the width, else the comment wrapped above `head`."""
    inline = f"{pad}{head}  # {desc}" if desc else f"{pad}{head}"
    return [inline] if len(inline) <= WIDTH else [*_comment(desc, pad), f"{pad}{head}"]


def render_fields(model: type[Section], values: Section | None = None, indent: int = 0, path: str = "",
                  only: str | None = None) -> list[str]:
    """Lines of `model`'s keys (values from `values`, else the field defaults); `only`: one key."""
    out: list[str] = []
    pad = " " * indent
    for name, field in model.model_fields.items():
        key = f"{path}{name}"
        if only is not None and name != only:
            continue
        desc = field.description or ""
        sub = section_type(field.annotation)
        if field.is_required() and sub is None:
            value = None
        elif values is not None:
            value = getattr(values, name)
        else:
            value = None if field.is_required() else field.get_default(call_default_factory=True)
        if sub is not None and not _is_list_of_sections(field.annotation):
            if indent == 0 and out:
                out.append("")
            if value is None and not field.is_required():  # an optional section, off by default: null, keys commented
                out += _keyed(pad, f"{name}: null", desc)
                out.append(f"{pad}#   when set:")
                out += [f"{pad}#     {line}" for line in render_fields(sub, None, 0, key + ".")]
                continue
            out += _keyed(pad, f"{name}:", desc)
            out += render_fields(sub, value if isinstance(value, Section) else None, indent + 2, key + ".")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if field.is_required():
            value_text, desc = REQUIRED, f"required: {desc}"
        elif value is None and "placeholder" in extra:
            value_text = extra["placeholder"]
        else:
            value_text = _scalar([v.model_dump(mode="json") for v in value] if sub is not None else value)
        out += _keyed(pad, f"{name}: {value_text}", desc)
        if sub is not None:  # a list of sections: each entry's keys, commented
            out.append(f"{pad}#   each entry:")
            for line in render_fields(sub, None, 0, key + "[]."):
                out.append(f"{pad}#     {line}")
    return out


def find_section(model: type[Section], dotted: str) -> tuple[type[Section], list[str]]:
    """(model holding the last part, the parts) for `learner`, `learner.rl`, `rollout.num_workers`."""
    parts = dotted.split(".")
    holder = model
    for i, part in enumerate(parts):
        fields = holder.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"config: {where} has no key {part!r}{did_you_mean(part, fields)}; "
                              f"keys: {', '.join(fields)}")
        sub = section_type(fields[part].annotation)
        if i < len(parts) - 1:
            if sub is None or _is_list_of_sections(fields[part].annotation):
                raise ConfigError(f"config: {'.'.join(parts[:i + 1])} is a value, not a section")
            holder = sub
    return holder, parts


def render(model: type[Section] = JobConfig, section: str | None = None) -> str:
    """The whole default config of `model` (with its header), or one section / key of it."""
    if section is None:
        header = [f"# {line}".rstrip() for line in HEADERS.get(model, "").splitlines()]
        return "\n".join(header + ([""] if header else []) + render_fields(model)) + "\n"
    holder, parts = find_section(model, section)
    lines = [f"# {section} (from `rlhf config`; the whole config: `rlhf config`)"]
    for depth, part in enumerate(parts[:-1]):
        lines.append(f"{' ' * 2 * depth}{part}:")
    prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    lines += render_fields(holder, None, 2 * (len(parts) - 1), prefix, only=parts[-1])
    return "\n".join(lines) + "\n"


def config_command(section: str | None) -> int:
    """`rlhf config [SECTION]`; `train-rm` / `train-sft` are the reward-model / SFT training configs."""
    if section in ("train-sft", "train_sft"):
        text = render(SFTJobConfig)
    elif section in ("train-rm", "train_rm"):
        text = render(RewardModelTrainConfig)
    elif section is not None and section.startswith(("train-rm.", "train_rm.")):
        text = render(RewardModelTrainConfig, section.split(".", 1)[1])
    else:
        text = render(JobConfig, section)
    print(text, end="")
    return 0
