"""Where raydistill keeps what it makes outside a run folder, and how it writes files that must never be half written."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_uri(value: str) -> bool:
    """Whether ``value`` names an object-store (``s3://``, ``gs://``...) or ``file://`` URI, not a local path."""
    return "://" in value


def is_remote_uri(value: str) -> bool:
    """Whether ``value`` names an object store (a URI other than ``file://``)."""
    return is_uri(value) and not value.startswith("file://")


def raydistill_home() -> Path:
    """``$RAYDISTILL_HOME``, default ``~/.cache/raydistill``: the synthetic dataset and fitted demo teachers."""
    return Path(os.environ.get("RAYDISTILL_HOME", Path.home() / ".cache" / "raydistill"))


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write`` on a temporary name beside ``path``, then rename it over ``path``.

    A write that fails (disk full, folder gone) leaves ``path`` as it was and no temporary file behind; the
    error propagates.
    """
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def publish_dir(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` in place of ``target`` (a folder cannot be renamed over a non-empty one:
    the old one is moved aside first, then removed)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
