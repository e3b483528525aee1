"""Placing a file that already exists elsewhere: a hard link when possible, else a durable copy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def link_or_copy(src: Path, dest: Path) -> bool:
    """Hard-link ``src`` at ``dest`` (same filesystem: no bytes copied); else copy and fsync. True if linked."""
    try:
        os.link(src, dest)
        return True
    except OSError:
        pass
    with Path(src).open("rb") as reader, Path(dest).open("wb") as writer:
        shutil.copyfileobj(reader, writer, 8 << 20)
        writer.flush()
        os.fsync(writer.fileno())
    return False
