"""Chat conversations: their checks, the JSON form they travel in, and rendering with a template.

A conversation is a list of messages `{"role": str, "content": str, ...}` (the OpenAI / Hugging
Face form). Between processes and in the Parquet it travels as a JSON string (one column type
whatever keys a data set's messages carry). Rendering always goes through the tokenizer's own
`apply_chat_template` (the template that ships with the checkpoint), never through a template of
ours: the policy renders prompts with the policy's template, the reward model re-renders the same
messages with its own.

A rendered template already holds every special token the model expects (a Llama-3 template
writes `<|begin_of_text|>` itself), so rendered text is tokenized WITHOUT the tokenizer's own
special tokens; plain-text prompts keep them, as before (`encode_prompts`).
"""
from __future__ import annotations

import json


class ChatError(ValueError):
    """A conversation that cannot be used; the message names the field (callers add the file/row)."""


def check_messages(value, field: str = "messages") -> list[dict]:
    """A validated conversation from a list of message dicts or its JSON string. Keys whose value is
    None are dropped (Arrow fills absent struct fields with nulls when rows carry different keys)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ChatError(f"field {field!r} is a string but not a JSON list of messages ({e.msg})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ChatError(f"field {field!r} must be a non-empty list of {{role, content}} messages "
                        f"(got {type(value).__name__}{' (empty)' if isinstance(value, (list, tuple)) else ''})")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ChatError(f"field {field!r}[{j}] must be a {{role, content}} object (got {type(m).__name__})")
        m = {k: v for k, v in m.items() if v is not None}
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = type(m[key]).__name__ if key in m else "missing"
                raise ChatError(f"field {field!r}[{j}].{key} must be a string (got {got})")
        out.append(m)
    return out


def to_json(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False)


def from_json(text: str | None) -> list[dict] | None:
    return None if text is None else json.loads(text)


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The conversation as text in `tokenizer`'s own chat template."""
    if not has_template(tokenizer):
        raise ChatError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja TemplateError or a template's own raise_exception
        raise ChatError(f"the chat template rejected the conversation: {str(e).splitlines()[0] if str(e) else e!r}"
                        ) from None


def encode(tokenizer, text: str, rendered: bool) -> list[int]:
    """Token ids of a prompt: rendered chat text without the tokenizer's added special tokens (the
    template wrote them), plain text with them (e.g. a BOS)."""
    return tokenizer(text, add_special_tokens=not rendered)["input_ids"]


def encode_prompts(tokenizer, texts: list[str], messages: list[str | None] | None = None) -> list[list[int]]:
    """Token ids per prompt; a row with `messages` set is rendered chat text (see `encode`)."""
    if messages is None or all(m is None for m in messages):
        return tokenizer(texts)["input_ids"]
    if all(m is not None for m in messages):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encode(tokenizer, t, m is not None) for t, m in zip(texts, messages)]


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
