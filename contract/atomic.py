"""Writing files and directories so that no reader ever sees them half written: the one way.

Every output a run leaves (config, metrics, Parquet, report, checkpoints, exported models, tiny
models) is written under a temporary sibling name and renamed into place. A crash leaves either
the old contents or the new, never a mix; a leftover temporary is ignored and cleaned later.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write; renamed onto `final` when the block ends
    without an error, removed otherwise."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(final: str | Path, data: bytes | str) -> None:
    """Replace `final` with `data` (str is written as UTF-8) in one rename."""
    with staged_file(final) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh, empty temporary directory beside `final`; it replaces `final` when the block
    ends without an error (see `replace_dir`), and is removed otherwise."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(staging: Path, final: Path) -> None:
    """Move the fully written `staging` directory to `final`, replacing any previous one.

    The old directory is renamed aside before the new one is renamed in, so a crash in between
    leaves the old contents on disk (as `<final>.old-*`) rather than a partial `final`.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
