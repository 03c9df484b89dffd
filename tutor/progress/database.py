"""The learner's progress file: one SQLite database, opened safely.

Where: ``tutor.paths.data_dir() / "progress.sqlite3"`` (the platform's user data dir, or
``$QUANT_TUTOR_HOME/data``), unless a path is given.

How it stays safe:

* **Committed as given.** Every call that writes is its own short transaction, committed
  before the call returns, so killing the app mid-quiz loses nothing; the unfinished
  attempt comes back from :meth:`tutor.progress.store.Store.open_attempt`.
* **Two instances at once.** WAL journal, ``PRAGMA busy_timeout`` (a second writer waits
  instead of failing) and ``BEGIN IMMEDIATE`` for every write, so a read-modify-write
  never has to upgrade a read lock (which SQLite refuses in WAL mode rather than wait).
* **Schema upgrades.** ``PRAGMA user_version`` holds the schema version; ``MIGRATIONS[i]``
  (:mod:`tutor.progress.schema`) takes the database from version ``i`` to ``i + 1``. All
  pending steps run in one transaction (:func:`tutor.progress.migrations.migrate`): an upgrade
  is applied whole or not at all.
* **Corrupt or foreign files.** A file that is not a database, fails ``PRAGMA
  quick_check``, or carries a ``user_version`` newer than this code knows is renamed to
  ``progress.sqlite3.corrupt-<UTC timestamp>`` (with its ``-wal``/``-shm``) and a fresh
  database is started; :attr:`Database.moved_aside` and :attr:`Database.notice` say so. Nothing
  is ever deleted or overwritten. A path that cannot be read at all (a directory,
  permission denied, a read-only file) raises :class:`StoreError` instead: moving it aside
  would not help, and the learner's data may be fine once the permissions are.
* **One opener at a time.** Checking, moving aside, creating and upgrading the file happen
  under an exclusive lock on ``progress.sqlite3.lock`` (:class:`filelock.FileLock`), so two
  instances starting together on a bad file move it aside once, not the fresh one too.
* **Append-only log.** Answers are only ever inserted; triggers refuse UPDATE and DELETE.

Needs only sqlite3 and filelock: importing this module costs a few tens of milliseconds.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from filelock import FileLock, Timeout

from tutor.files import sqlite_corruption
from tutor.progress import schema
from tutor.progress.errors import StoreError
from tutor.progress.migrations import migrate

DB_NAME = "progress.sqlite3"
BUSY_TIMEOUT_MS = 15_000
OPEN_LOCK_TIMEOUT_S = 60.0
_SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_HEADER = b"SQLite format 3\x00"
_ACCESS_HINT = (
    "Check that you can read and write it and its folder, or set QUANT_TUTOR_HOME to use another folder."
)
_ZEROS = bytes(len(_SQLITE_HEADER))
_GONE = "the file disappeared while being checked"  # another instance moved it: look again


def default_path() -> Path:
    """``data_dir()/progress.sqlite3``; honours ``QUANT_TUTOR_HOME``."""
    from tutor.paths import data_dir

    return data_dir() / DB_NAME


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Database:
    """The progress file, open: checked, repaired or moved aside, upgraded. Thread-safe: one lock
    serialises calls on this connection."""

    path: Path
    moved_aside: Path | None
    notice: str | None

    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.RLock()
        self.moved_aside = None
        self.notice = None
        if path is None:
            try:
                path = default_path()
            except OSError as exc:
                raise StoreError(f"Cannot create the quant-tutor data folder: {exc}. {_ACCESS_HINT}") from exc
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = self._open()

    # --- opening -----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the folder for the progress database {self.path}: {exc}. {_ACCESS_HINT}"
            ) from exc
        with self._opening_lock():
            return self._open_locked()

    @contextmanager
    def _opening_lock(self) -> Iterator[None]:
        """Only one process at a time checks, moves aside, creates or upgrades the file.

        Without it, two instances starting together on a bad file could both decide to
        move it aside, and the slower one would move away the fresh database the faster
        one had just created. Instances that are already running never take this lock:
        once open, SQLite's own locking is all they need. The lock file holds nothing; it
        is readable and writable by the user alone.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock = FileLock(lock_path, timeout=OPEN_LOCK_TIMEOUT_S, mode=0o600)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(
                f"Another quant-tutor has been opening {self.path} for over "
                f"{OPEN_LOCK_TIMEOUT_S:.0f} s; try again, or check for a stuck process."
            ) from None
        except OSError as exc:
            raise StoreError(
                f"Cannot create the lock file {lock_path} next to the progress database: {exc}. "
                "Fix the folder's permissions, or set QUANT_TUTOR_HOME to use another folder."
            ) from exc
        try:
            yield
        finally:
            lock.release()

    def _open_locked(self) -> sqlite3.Connection:
        # A few rounds, in case something outside quant-tutor changes the file meanwhile.
        for _ in range(5):
            header = self._probe()
            seen = _file_id(self.path)
            if seen is not None:
                if len(header) == len(_SQLITE_HEADER) and header not in (_SQLITE_HEADER, _ZEROS):
                    # Not SQLite at all: move it without letting SQLite near it (or its side
                    # files). Zeros are left to SQLite to judge: a file being extended reads so.
                    problem: str | None = "it is not an SQLite database"
                else:
                    problem = self._inspect()
                if problem is _GONE:
                    continue
                if problem is not None:
                    self._move_aside(problem, seen)
                    continue
            conn = self._connect()
            try:
                self._prepare(conn)
                migrate(conn, self.path)
            except BaseException:
                conn.close()
                raise
            return conn
        raise StoreError(
            f"Could not open the progress database {self.path}: it kept changing while being "
            "checked (is another program rewriting it?)."
        )

    def _probe(self) -> bytes:
        """The file's first bytes (b"" when absent); fails clearly when the path cannot be
        read or written at all."""
        hint = _ACCESS_HINT
        try:
            with open(self.path, "rb") as fh:
                header = fh.read(len(_SQLITE_HEADER))
        except FileNotFoundError:
            return b""
        except IsADirectoryError as exc:
            raise StoreError(
                f"The progress database path {self.path} is a directory, not a file. {hint}"
            ) from exc
        except PermissionError as exc:
            raise StoreError(
                f"Cannot read the progress database {self.path}: permission denied. {hint}"
            ) from exc
        except OSError as exc:
            raise StoreError(f"Cannot read the progress database {self.path}: {exc}. {hint}") from exc
        if self.path.is_dir():  # Windows reports a directory as PermissionError above
            raise StoreError(f"The progress database path {self.path} is a directory, not a file. {hint}")
        if not os.access(self.path, os.W_OK):
            raise StoreError(f"The progress database {self.path} is read-only for you. {hint}")
        return header

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot open the progress database {self.path}: {exc}. {_ACCESS_HINT}") from exc
        return conn

    def _inspect(self) -> str | None:
        """Why the existing file cannot be our database, or None when it can.

        Looks through a read-only connection: a read-only connection never checkpoints,
        rolls back or deletes a ``-wal``/``-shm`` on close, so a file that turns out bad is
        moved aside exactly as it was found.
        """
        try:
            conn = sqlite3.connect(
                self.path.resolve().as_uri() + "?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            if not self.path.exists():
                return _GONE
            raise StoreError(f"Cannot open the progress database {self.path}: {exc}. {_ACCESS_HINT}") from exc
        try:
            return self._inspect_with(conn)
        finally:
            conn.close()

    def _inspect_with(self, conn: sqlite3.Connection) -> str | None:
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
            if [tuple(r) for r in rows] != [("ok",)]:
                first = "; ".join(str(r[0]) for r in rows[:3])
                return f"it failed SQLite's integrity check ({first})"
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            latest = len(schema.MIGRATIONS)
            if version > latest:
                return (
                    f"it was written by a newer version of quant-tutor (schema version {version}; "
                    f"this version understands up to {latest})"
                )
            if version == 0:
                tables = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                ).fetchone()[0]
                if tables:
                    return "it is an SQLite database, but not a quant-tutor progress database"
        except sqlite3.Error as exc:
            if sqlite_corruption(exc):
                return f"it is not a readable SQLite database ({exc})"
            if not self.path.exists():
                return _GONE
            raise StoreError(f"Cannot read the progress database {self.path}: {exc}. {_ACCESS_HINT}") from exc
        return None

    def _move_aside(self, problem: str, seen: tuple[int, int, int] | None) -> None:
        """Rename the bad file (and its -wal/-shm) out of the way; never delete or overwrite."""
        if seen is None or _file_id(self.path) != seen:
            return  # it changed under us (another instance moved or replaced it): look again
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"{self.path.name}.corrupt-{stamp}"
        target = self.path.with_name(base)
        n = 1
        while any(Path(f"{target}{s}").exists() for s in ("", *_SIDE_FILES)):
            target = self.path.with_name(f"{base}-{n}")
            n += 1
        try:
            os.rename(self.path, target)
        except FileNotFoundError:
            return  # another instance moved it first
        except OSError as exc:
            raise StoreError(
                f"The progress database {self.path} is unusable ({problem}), and moving it aside "
                f"failed: {exc}. Move it away by hand to start fresh."
            ) from exc
        for suffix in _SIDE_FILES:
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                try:
                    os.rename(side, Path(f"{target}{suffix}"))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StoreError(f"Moving {side} aside failed: {exc}. Move it away by hand.") from exc
        self.moved_aside = target
        self.notice = (
            f"Your progress database {self.path} could not be used: {problem}. "
            f"It was moved aside to {target} (nothing was deleted), and a fresh progress "
            "database was started."
        )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            # Changing the journal mode needs a moment alone with the file; the busy
            # handler does not always cover it, so retry briefly on "locked".
            for tries in range(50):
                try:
                    conn.execute("PRAGMA journal_mode = WAL").fetchone()
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    if tries == 49:
                        raise
                    time.sleep(0.1)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StoreError(
                f"Cannot set up the progress database {self.path}: {exc}. {_ACCESS_HINT}"
            ) from exc

    # --- plumbing ----------------------------------------------------------------------

    @contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite errors turned into StoreError."""
        with self._lock:
            if self._conn is None:
                raise StoreError("The progress store is closed.")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"Progress database {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, committed before the call returns."""
        with self._use() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for a read made of several queries."""
        with self._use() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"
