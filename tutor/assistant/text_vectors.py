"""Texts' embeddings kept across runs: one SQLite file per embedding model, beside the index.

A question's quote and its support check compare it with the sentences (and sentence pairs and
clauses) of the passages it found, and each of those is a text to embed: 6-20 of them per
question, 0.17-0.41 s of its first token on a 2-core AVX2 EPYC, paid again at every start of the
app. Kept here, they are embedded once per machine (`quant-tutor warm` embeds every lesson's).

Rows are keyed by a digest of the text; the file name carries a digest of the model's id, so
another model never reads these vectors. It is a cache: a file whose bytes are bad is moved
aside and started afresh, and any other error (busy past the timeout, no permission, a full
disk) leaves this process embedding as if the store were empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from tutor.files import sqlite_corruption

# The most texts kept (about 1.5 KB each at 384 floats: 31 MB); past it the oldest go first.
# The shipped lessons' quotable texts are about 2,000; questions and answers' sentences add one
# row each.
STORE_LIMIT = 20_000
BUSY_TIMEOUT_S = 5.0
_SIDE_FILES = ("-wal", "-shm", "-journal")


def store_path(index_dir: Path, model_name: str) -> Path:
    digest = hashlib.sha256(model_name.encode("utf-8")).hexdigest()[:16]
    return index_dir / f"texts-{digest}.sqlite3"


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


class TextVectors:
    """The store at ``path``, opened on first use. Not thread-safe: its caller holds a lock
    (``MemoEmbedder``'s)."""

    def __init__(self, path: Path, width: int) -> None:
        self.path = path
        self.width = width
        self.problem: str | None = None  # why it is not used in this process
        self._db: sqlite3.Connection | None = None

    def get(self, texts: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those ``texts`` that have one."""
        wanted = {_key(t): t for t in texts}
        db = self._open()
        if db is None or not wanted:
            return {}
        found: dict[str, np.ndarray] = {}
        keys = list(wanted)
        try:
            for start in range(0, len(keys), 500):  # SQLite's bound on a statement's parameters
                part = keys[start : start + 500]
                rows = db.execute(
                    f"SELECT key, vector FROM texts WHERE key IN ({','.join('?' * len(part))})", part
                ).fetchall()
                for key, blob in rows:
                    if len(blob) == 4 * self.width:
                        found[wanted[key]] = np.frombuffer(blob, dtype=np.float32)
        except sqlite3.Error as exc:
            self._give_up(exc)
            return {}
        return found

    def put(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Keep these texts' vectors (float32, ``width`` wide), then trim to ``STORE_LIMIT``."""
        db = self._open()
        if db is None or not vectors:
            return
        rows = [(_key(t), np.ascontiguousarray(v, dtype=np.float32).tobytes()) for t, v in vectors.items()]
        try:
            with db:
                db.executemany("INSERT OR IGNORE INTO texts (key, vector) VALUES (?, ?)", rows)
                db.execute(
                    "DELETE FROM texts WHERE rowid <= (SELECT max(rowid) FROM texts) - ?", (STORE_LIMIT,)
                )
        except sqlite3.Error as exc:
            self._give_up(exc)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _open(self) -> sqlite3.Connection | None:
        if self._db is None and self.problem is None:
            try:
                self._db = self._connect()
            except sqlite3.Error as exc:
                if not sqlite_corruption(exc):
                    self.problem = f"{self.path}: {exc}"
                    return None
                self._move_aside()
                try:
                    self._db = self._connect()
                except sqlite3.Error as again:
                    self.problem = f"{self.path}: {again}"
            except OSError as exc:
                self.problem = f"{self.path}: {exc}"
        return self._db

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(mode=0o600)  # the learner's questions are among its texts: theirs alone
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            # WAL: an app and a CLI may write at once; NORMAL: no sync per commit (a cache).
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS texts (key BLOB NOT NULL UNIQUE, vector BLOB NOT NULL)")
        except BaseException:
            db.close()
            raise
        return db

    def _give_up(self, exc: sqlite3.Error) -> None:
        """Stop using the store in this process; a damaged file is moved aside for the next."""
        self.close()
        self.problem = f"{self.path}: {exc}"
        if sqlite_corruption(exc):
            self._move_aside()

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for suffix in ("", *_SIDE_FILES):
            source = self.path.with_name(self.path.name + suffix)
            # Absent, or out of reach (then opening it fails again, and the store is not used).
            with contextlib.suppress(OSError):
                source.rename(source.with_name(f"{self.path.name}.corrupt-{stamp}{suffix}"))
