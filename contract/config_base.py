"""Strict pydantic base for every config section, and config errors as one line per problem.

Every package owns its section as a subclass of `Section`; unknown keys are errors (a typo'd key
must never be silently ignored on a cluster job that runs for hours). Every field carries a
`description` (what it is, its unit, why the default): `rlhf config` prints them as the comments
of the default job YAML, and a test fails on a field without one.
"""
from __future__ import annotations

import difflib
import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """Config problems, each already phrased as one line naming the key and the expected form.

    `lines` holds every problem found (one or more); `str()` joins them with newlines."""

    def __init__(self, *lines: str):
        self.lines = [str(line) for line in lines] or ["invalid config"]
        super().__init__("\n".join(self.lines))


def section_type(annotation) -> type[Section] | None:
    """The Section class a field holds: itself, optional, or as the items of a list or dict."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        for arg in typing.get_args(annotation):
            found = section_type(arg)
            if found is not None:
                return found
    return None


def _key(model: type[Section] | None, loc: tuple) -> tuple[str, type[Section] | None]:
    """(`a.b[0].c` for an error location, the Section holding its last part). Parts that are not
    keys (pydantic's union tags) are dropped."""
    parts: list[str] = []
    holder = current = model
    for p in loc:
        holder = current
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        elif current is not None and p in current.model_fields:
            parts.append(p)
            current = section_type(current.model_fields[p].annotation)
        elif current is None and parts:
            break  # a tag inside a plain value's error
        else:
            parts.append(str(p))
            current = None
    return ".".join(parts), holder


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def describe_validation_errors(err: ValidationError, model: type[Section] | None = None) -> list[str]:
    """Every problem of a ValidationError as `key.path: what was expected (got X)`, one line each;
    an unknown key gets the closest known key of its section as 'did you mean'."""
    lines: list[str] = []
    for e in err.errors():
        key, holder = _key(model, tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            name = str(e["loc"][-1])
            hint = did_you_mean(name, holder.model_fields) if holder is not None else ""
            msgs = [f"unknown key{hint}"]
        else:
            msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            got = e.get("input")
            got_s = "" if e["type"] in ("missing", "value_error") or isinstance(got, (dict, list)) else f" (got {got!r})"
            msgs = [m[:1].lower() + m[1:] + got_s for m in msg.splitlines() if m.strip()]
        for m in msgs:
            # A check of a section or the whole job may name its keys itself.
            line = m if not key or m.startswith((key + ".", key + ":")) else f"{key}: {m}"
            if line not in lines:
                lines.append(line)
    return lines

