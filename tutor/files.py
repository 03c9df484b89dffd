"""Atomic file writes (a reader sees the old file or the new one, never half of one), and
telling an SQLite file whose bytes are bad from one that is only busy or out of reach."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: Path, write: Callable[[IO[Any]], object]) -> None:
    """Call ``write`` on a temp file beside ``path`` (binary), fsync it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# SQLite primary result codes that mean "the bytes are bad", as opposed to "cannot get at them"
# (busy, locked, permissions, I/O): only these justify moving a file aside.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def sqlite_corruption(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the database file is damaged or not a database at all."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text
