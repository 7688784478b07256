"""Replacing a directory (a checkpoint, an exported model) so no reader ever sees it half written."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path


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
