"""Dataset readers (prompts, preference pairs, SFT examples, human feedback) and a resumable
prompt iterator.

Formats: Parquet, JSON lines, and Hugging Face `datasets` directories written with `save_to_disk`
(read with `datasets.load_from_disk`; nothing is fetched from a hub). All go through pyarrow.
Column names are configurable (`Columns`). A prompt, a preference side or an SFT example may be
plain text or a chat conversation (`messages`: a list of {role, content}); see `contract/chat.py`.

Every problem is a `DatasetError` whose message is one line naming the file and the column, row
or field, because a bad data file found two hours into a cluster job is the worst kind.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import Field

from contract import chat
from contract.config_base import Section


class DatasetError(ValueError):
    pass


class Columns(Section):
    """Which column holds what, so a data set is read as it is published (no renaming pass)."""

    id: str = Field("id", description="unique prompt id (any type, read as text); when absent, a 'prompt_id' "
                                      "column, else the row number: ids key the exactly-once accounting")
    prompt: str = Field("prompt", description="plain-text prompt, or a conversation (list of {role, content}) "
                                              "as TRL's conversational format has it")
    messages: str = Field("messages", description="chat conversation (list of {role, content}, or its JSON "
                                                  "text); rendered with the policy's chat template. Wins over "
                                                  "'prompt' in rows where both are set")
    response: str = Field("response", description="SFT target / pointwise-labelled reply; a 'completion' "
                                                  "column is used when this one is absent (TRL/KTO naming)")
    chosen: str = Field("chosen", description="preferred reply: text, or a conversation ending in it")
    rejected: str = Field("rejected", description="dispreferred reply: text, or a conversation ending in it")
    label: str = Field("label", description="pointwise like (1/true) or dislike (0/false)")
    answer: str = Field("answer", description="a prompt's reference answer (text or number), which "
                                              "reward.verifier checks responses against; prompts only")
    split: str | None = Field(None, description="split of a save_to_disk DatasetDict directory; None: 'train' "
                                                "if present, else its only split")


DEFAULT_COLUMNS = Columns()


def read_table(path: str | Path, split: str | None = None) -> pa.Table:
    """A Parquet (.parquet) or JSON-lines (.jsonl/.json) file, or a `datasets.save_to_disk`
    directory, as an Arrow table."""
    p = Path(path)
    if p.is_dir():
        table = _read_saved_dataset(p, split)
    elif not p.is_file():
        raise DatasetError(f"{p}: file not found")
    else:
        table = _read_file(p)
    if table.num_rows == 0:
        raise DatasetError(f"{p}: file has no rows")
    return table


def _read_file(p: Path) -> pa.Table:
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(p)
        if suffix in (".jsonl", ".json"):
            raw = p.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{p}: not valid UTF-8 (byte {e.start})") from None
            if not raw.strip():
                raise DatasetError(f"{p}: file is empty")
            return pajson.read_json(p)
        raise DatasetError(f"{p}: unsupported extension {suffix!r}; expected .parquet, .jsonl or a "
                           f"datasets save_to_disk directory")
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{p}: cannot be parsed: {str(e).splitlines()[0]}") from None


def _read_saved_dataset(p: Path, split: str | None) -> pa.Table:
    """A `Dataset` or `DatasetDict` directory from `save_to_disk` (local only)."""
    if not ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise DatasetError(f"{p}: a directory, but not one written by datasets' save_to_disk "
                           f"(no dataset_info.json or dataset_dict.json)")
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{p}: reading a save_to_disk directory needs the `datasets` package") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - whatever the library raises, as one line
        raise DatasetError(f"{p}: cannot be read by datasets.load_from_disk: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick is None or pick not in ds:
            raise DatasetError(f"{p}: split {split!r} not found; the directory has splits {names} (set split)")
        ds = ds[pick]
    elif split is not None:
        raise DatasetError(f"{p}: split {split!r} given, but the directory holds one Dataset, not a DatasetDict")
    return ds.with_format("arrow")[:]


def require_text(table: pa.Table, path, columns: list[str]) -> None:
    for c in columns:
        if c not in table.column_names:
            raise DatasetError(f"{path}: missing column {c!r}; expected columns {columns} (found {table.column_names})")
        col = table.column(c)
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            raise DatasetError(f"{path}: column {c!r} must be text (found {col.type})")
        nulls = pc.indices_nonzero(pc.is_null(col)).to_pylist()
        if nulls:
            raise DatasetError(f"{path}: column {c!r} is null in row(s) {nulls[:5]}")


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _values(table: pa.Table, column: str | None) -> list:
    """The column as Python values (None for every row when the column is absent)."""
    if column is None or column not in table.column_names:
        return [None] * table.num_rows
    return table.column(column).to_pylist()


def _conversation(path, i: int, value, field: str) -> list[dict]:
    try:
        return chat.check_messages(value, field)
    except chat.ChatError as e:
        raise DatasetError(f"{path}: row {i}: {e}") from None


def _text_or_conversation(path, i: int, value, field: str):
    """A str, or a validated conversation for a list value; anything else is an error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _conversation(path, i, value, field)
    raise DatasetError(f"{path}: row {i}: field {field!r} must be text or a list of {{role, content}} messages "
                       f"(got {type(value).__name__})")


def _ids(table: pa.Table, path, cols: Columns) -> pa.Array:
    name = cols.id if cols.id in table.column_names else "prompt_id" if "prompt_id" in table.column_names else None
    if name is None:
        return pa.array([str(i) for i in range(table.num_rows)])
    try:
        ids = pc.cast(table.column(name), pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DatasetError(f"{path}: column {name!r} cannot be read as text ids (type {table.column(name).type})"
                           ) from None
    if pc.any(pc.is_null(ids)).as_py():
        raise DatasetError(f"{path}: column {name!r} has nulls")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        raise DatasetError(f"{path}: column {name!r} has duplicate values")
    return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids


def _need(table: pa.Table, path, *alternatives: str) -> None:
    if not any(c in table.column_names for c in alternatives):
        want = " or ".join(repr(c) for c in alternatives)
        raise DatasetError(f"{path}: missing column {want}; found {table.column_names} (column names are "
                           f"configurable: data.columns)")


def render_prompt(path, i: int, messages: list[dict], tokenizer) -> str:
    """The conversation in the policy's chat template with the generation prompt added."""
    if tokenizer is None:
        raise DatasetError(f"{path}: row {i} is a conversation, but no tokenizer was given to render it")
    if not chat.has_template(tokenizer):
        raise DatasetError(f"{path}: row {i} is a conversation, but the policy tokenizer "
                           f"{getattr(tokenizer, 'name_or_path', '')!r} has no chat template; give plain-text "
                           f"prompts or a model with a chat template")
    try:
        return chat.render(tokenizer, messages, add_generation_prompt=True)
    except chat.ChatError as e:
        raise DatasetError(f"{path}: row {i}: field 'messages': {e}") from None


def load_prompts(path: str | Path, columns: Columns | None = None, tokenizer=None) -> pa.Table:
    """Columns: `prompt_id` (from the id column if present, else the row number), `prompt` (the
    text the policy continues), `messages` (the conversation as JSON, null for plain prompts), and
    `reference` (the reference answer) when the file has an answer column.

    A conversation is rendered here, once, with `tokenizer`'s chat template (the policy's) and the
    generation prompt added; a trailing assistant message (a data set's reference reply) is dropped
    first, so the policy writes that turn itself."""
    cols = columns or DEFAULT_COLUMNS
    table = read_table(path, cols.split)
    _need(table, path, cols.prompt, cols.messages)
    if cols.prompt in table.column_names:
        typ = table.schema.field(cols.prompt).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_null(typ)) and (
                not _is_text(typ) or cols.messages not in table.column_names):
            require_text(table, path, [cols.prompt])  # plain-text prompts: column-level checks, as before
    texts, convs = [], []
    for i, (prompt, msgs) in enumerate(zip(_values(table, cols.prompt), _values(table, cols.messages))):
        if msgs is None and isinstance(prompt, (list, tuple)):
            msgs, field = prompt, cols.prompt
        else:
            field = cols.messages
        if msgs is not None:
            conv = _conversation(path, i, msgs, field)
            if conv[-1]["role"] == "assistant":
                conv = conv[:-1]
            if not conv:
                raise DatasetError(f"{path}: row {i}: field {field!r} has only an assistant reply; a prompt needs "
                                   f"at least one message before it")
            texts.append(render_prompt(path, i, conv, tokenizer))
            convs.append(chat.to_json(conv))
        elif isinstance(prompt, str):
            texts.append(prompt)
            convs.append(None)
        else:
            what = f"field {cols.prompt!r} must be text (got {type(prompt).__name__})" if prompt is not None \
                else f"neither {cols.prompt!r} nor {cols.messages!r} is set"
            raise DatasetError(f"{path}: row {i}: {what}")
    out = {"prompt_id": _ids(table, path, cols), "prompt": pa.array(texts, pa.string()),
           "messages": pa.array(convs, pa.string())}
    if cols.answer in table.column_names:
        out["reference"] = pa.array(_references(path, _values(table, cols.answer), cols.answer), pa.string())
    return pa.table(out)


def _references(path, values: list, column: str) -> list[str]:
    """Reference answers as text (numbers as written: 12, 2.5); a missing one is an error, not a 0."""
    out = []
    for i, v in enumerate(values):
        if v is None or isinstance(v, (dict, list)) or (isinstance(v, float) and math.isnan(v)):
            raise DatasetError(f"{path}: row {i}: field {column!r} must be a reference answer (text or a number), "
                               f"got {v!r}")
        out.append(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return out


def require_answers(prompts: pa.Table, path, column: str) -> None:
    """A verifier needs every prompt's reference answer: one line naming the file and the column."""
    if "reference" not in prompts.column_names:
        raise DatasetError(f"{path}: no {column!r} column; reward.verifier checks each response against the "
                           f"prompt's reference answer (name its column with data.columns.answer)")


def _split_strings(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two full texts with an implicit shared prompt (the
    Anthropic HH shape): the common prefix, cut back to a whitespace so no word is split."""
    n = chat.common_prefix(chosen, rejected)
    if n < min(len(chosen), len(rejected)):
        cut = max(chosen.rfind(c, 0, n) for c in " \n\t")
        n = cut if cut >= 0 else n
    return chosen[:n], chosen[n:], rejected[n:]


def _reply(path, i: int, rest: list[dict], field: str) -> str:
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        roles = [m["role"] for m in rest]
        raise DatasetError(f"{path}: row {i}: field {field!r} must end in exactly one assistant reply after the "
                           f"shared prompt (got roles {roles} after it)")
    return rest[0]["content"]


def _pair(path, i: int, prompt, chosen, rejected, cols: Columns) -> tuple[str, str | None, str, str]:
    """(prompt text, prompt conversation JSON or None, chosen reply, rejected reply) of one row."""
    prompt = _text_or_conversation(path, i, prompt, cols.prompt)
    chosen = _text_or_conversation(path, i, chosen, cols.chosen)
    rejected = _text_or_conversation(path, i, rejected, cols.rejected)
    for name, v in ((cols.chosen, chosen), (cols.rejected, rejected)):
        if v is None:
            raise DatasetError(f"{path}: row {i}: field {name!r} is null")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DatasetError(f"{path}: row {i}: fields {cols.chosen!r} and {cols.rejected!r} must both be text or "
                           f"both be message lists")
    if isinstance(chosen, str):
        if prompt is None:
            text, c, r = _split_strings(chosen, rejected)
            return text, None, c, r
        if isinstance(prompt, str):
            return prompt, None, chosen, rejected
        return "", chat.to_json(prompt), chosen, rejected
    n = chat.common_prefix(chosen, rejected)
    if n == len(chosen) and n == len(rejected):
        raise DatasetError(f"{path}: row {i}: fields {cols.chosen!r} and {cols.rejected!r} are the same conversation")
    if n:
        conv = chosen[:n]
    elif prompt is None:
        raise DatasetError(f"{path}: row {i}: fields {cols.chosen!r}/{cols.rejected!r} share no prompt messages and "
                           f"there is no {cols.prompt!r}")
    else:
        conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return "", chat.to_json(conv), _reply(path, i, chosen[n:], cols.chosen), _reply(path, i, rejected[n:], cols.rejected)


def load_preferences(path: str | Path, columns: Columns | None = None) -> pa.Table:
    """Pairwise preferences (the Bradley-Terry training set) in the shapes public sets come in:
    `prompt` + `chosen`/`rejected` texts; `chosen`/`rejected` texts with the prompt implicit in
    both (their common prefix, as in Anthropic HH); `chosen`/`rejected` as full conversations
    ending in the reply, with or without a separate `prompt` (text or messages).

    Columns out: `prompt` (text; "" for a conversation), `messages` (the prompt conversation as
    JSON, null for plain text), `chosen`, `rejected` (the reply texts)."""
    cols = columns or DEFAULT_COLUMNS
    table = read_table(path, cols.split)
    for c in (cols.chosen, cols.rejected):
        _need(table, path, c)
    rows = [_pair(path, i, p, c, r, cols) for i, (p, c, r) in enumerate(zip(
        _values(table, cols.prompt), _values(table, cols.chosen), _values(table, cols.rejected)))]
    names = ["prompt", "messages", "chosen", "rejected"]
    return pa.table({n: pa.array([row[k] for row in rows], pa.string()) for k, n in enumerate(names)})


def _response_column(table: pa.Table, cols: Columns) -> str:
    return cols.response if cols.response in table.column_names or "completion" not in table.column_names \
        else "completion"


def _prompt_and_reply(path, i: int, prompt, response, cols: Columns, resp_col: str,
                      ) -> tuple[str | None, str | None, str]:
    """(prompt text or None, prompt conversation JSON or None, reply) of a pointwise/SFT row whose
    reply is one assistant turn."""
    prompt = _text_or_conversation(path, i, prompt, cols.prompt)
    response = _text_or_conversation(path, i, response, resp_col)
    if response is None:
        raise DatasetError(f"{path}: row {i}: field {resp_col!r} is null")
    if isinstance(response, str):
        if isinstance(prompt, list):
            return "", chat.to_json(prompt), response
        if prompt is None:
            raise DatasetError(f"{path}: row {i}: field {cols.prompt!r} is null")
        return prompt, None, response
    conv = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt or []) + response[:-1]
    if not conv:
        raise DatasetError(f"{path}: row {i}: field {resp_col!r} has no prompt messages and {cols.prompt!r} is null")
    return "", chat.to_json(conv), _reply(path, i, response[-1:], resp_col)


def load_labels(path: str | Path, columns: Columns | None = None) -> pa.Table:
    """Pointwise like/dislike (KTO-style): `prompt` (text or messages) + `response`/`completion`
    (text, or messages ending in the reply) + `label` in {0, 1} or a boolean.

    Columns out: `prompt`, `messages` (as in `load_preferences`), `response`, `label` (0.0/1.0)."""
    cols = columns or DEFAULT_COLUMNS
    table = read_table(path, cols.split)
    resp_col = _response_column(table, cols)
    _need(table, path, resp_col)
    labels = _numeric(table, path, cols.label)
    bad = [i for i, v in enumerate(labels) if v not in (0.0, 1.0)]
    if bad:
        raise DatasetError(f"{path}: column {cols.label!r} must be 0 or 1 (or a boolean); row {bad[0]} has "
                           f"{labels[bad[0]]!r}")
    rows = [_prompt_and_reply(path, i, p, r, cols, resp_col)
            for i, (p, r) in enumerate(zip(_values(table, cols.prompt), _values(table, resp_col)))]
    return pa.table({"prompt": pa.array([r[0] for r in rows], pa.string()),
                     "messages": pa.array([r[1] for r in rows], pa.string()),
                     "response": pa.array([r[2] for r in rows], pa.string()), "label": labels})


def load_sft(path: str | Path, columns: Columns | None = None) -> pa.Table:
    """Supervised fine-tuning examples: a `messages` conversation with at least one assistant turn
    (every assistant turn is a target), or `prompt` + `response`/`completion` (text or messages).

    Columns out: `messages` (the whole conversation as JSON, null for plain text), `prompt` and
    `response` (the texts of a plain example, null for a conversation)."""
    cols = columns or DEFAULT_COLUMNS
    table = read_table(path, cols.split)
    resp_col = _response_column(table, cols)
    if cols.messages not in table.column_names:
        _need(table, path, resp_col)
    out = {"messages": [], "prompt": [], "response": []}
    for i, (msgs, prompt, response) in enumerate(zip(_values(table, cols.messages), _values(table, cols.prompt),
                                                     _values(table, resp_col))):
        if msgs is not None:
            conv = _conversation(path, i, msgs, cols.messages)
            if not any(m["role"] == "assistant" for m in conv):
                raise DatasetError(f"{path}: row {i}: field {cols.messages!r} has no assistant message to learn")
            row = (chat.to_json(conv), None, None)
        else:
            if response is None and cols.messages in table.column_names:
                raise DatasetError(f"{path}: row {i}: neither {cols.messages!r} nor {resp_col!r} is set")
            text, conv, reply = _prompt_and_reply(path, i, prompt, response, cols, resp_col)
            row = (None, text, reply) if conv is None else (
                chat.to_json(json.loads(conv) + [{"role": "assistant", "content": reply}]), None, None)
        for k, v in zip(out, row):
            out[k].append(v)
    return pa.table({k: pa.array(v, pa.string()) for k, v in out.items()})


def validate_feedback(rec: dict, where: str = "feedback") -> dict:
    """One human feedback record {prompt, response, score in [-1, 1]} or a DatasetError."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected an object with prompt, response, score")
    for k in ("prompt", "response"):
        if not isinstance(rec.get(k), str):
            raise DatasetError(f"{where}: field {k!r} must be a string")
    s = rec.get("score")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not -1 <= s <= 1:
        raise DatasetError(f"{where}: field 'score' must be a number in [-1, 1] (got {s!r})")
    return {"prompt": rec["prompt"], "response": rec["response"], "score": float(s)}


def load_feedback(path: str | Path) -> list[dict]:
    """Human feedback records from a JSON-lines or Parquet file, each validated."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json") and p.is_file():
        recs = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    recs.append(validate_feedback(json.loads(line), f"{p}:{i}"))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{p}:{i}: invalid JSON ({e.msg})") from None
        return recs
    return [validate_feedback(r, f"{p}:{i}") for i, r in enumerate(read_table(p).to_pylist(), 1)]


def _numeric(table: pa.Table, path, column: str) -> list[float]:
    if column not in table.column_names:
        raise DatasetError(f"{path}: missing column {column!r}")
    try:
        values = pc.cast(table.column(column), pa.float64()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DatasetError(f"{path}: column {column!r} must be numeric (found {table.column(column).type})") from None
    nulls = [i for i, v in enumerate(values) if v is None]
    if nulls:
        raise DatasetError(f"{path}: column {column!r} is null in row(s) {nulls[:5]}")
    return values


@dataclass
class PromptIterator:
    """Endless, seeded, epoch-reshuffled batches of prompts whose position can be saved and restored.

    The order depends only on (seed, epoch), so a resumed run replays exactly the prompts an
    uninterrupted one would have seen.
    """

    table: pa.Table
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.table.num_rows == 0:
            raise DatasetError("prompt dataset is empty")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.table.num_rows)

    def next_batch(self, size: int) -> pa.Table:
        idx: list[int] = []
        while len(idx) < size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(idx), len(self._order) - self.position)
            idx.extend(self._order[self.position:self.position + take].tolist())
            self.position += take
        return self.table.take(pa.array(idx))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_rows": self.table.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.table.num_rows or state["seed"] != self.seed:
            raise DatasetError("prompt iterator state does not match this dataset (rows or seed differ)")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
