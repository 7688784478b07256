"""Strict pydantic base for every config section, and one-line rendering of config errors.

Every package owns its section as a subclass of `Section`; unknown keys are errors (a typo'd key
must never be silently ignored on a cluster job that runs for hours).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """A config problem, already phrased as one line naming the key and the expected form."""


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """First error of a pydantic ValidationError as `key.path: what was expected (got X)`."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    if e["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {e['msg'].lower()}{got_s}"
