"""The learner's progress, kept in one SQLite file.

Where: ``tutor.paths.data_dir() / "progress.sqlite3"`` (the platform's user data dir, or
``$QUANT_TUTOR_HOME/data``), unless a path is given.

How it stays safe:

* **Committed as given.** Every call that writes is its own short transaction, committed
  before the call returns, so killing the app mid-quiz loses nothing; the unfinished
  attempt comes back from :meth:`Store.open_attempt`.
* **Two instances at once.** WAL journal, ``PRAGMA busy_timeout`` (a second writer waits
  instead of failing) and ``BEGIN IMMEDIATE`` for every write, so a read-modify-write
  never has to upgrade a read lock (which SQLite refuses in WAL mode rather than wait).
* **Schema upgrades.** ``PRAGMA user_version`` holds the schema version; ``MIGRATIONS[i]``
  takes the database from version ``i`` to ``i + 1``. All pending steps run in one
  transaction: an upgrade is applied whole or not at all. A new schema version appends a
  step; never edit a step that has shipped.
* **Corrupt or foreign files.** A file that is not a database, fails ``PRAGMA
  quick_check``, or carries a ``user_version`` newer than this code knows is renamed to
  ``progress.sqlite3.corrupt-<UTC timestamp>`` (with its ``-wal``/``-shm``) and a fresh
  database is started; :attr:`Store.moved_aside` and :attr:`Store.notice` say so. Nothing
  is ever deleted or overwritten. A path that cannot be read at all (a directory,
  permission denied, a read-only file) raises :class:`StoreError` instead: moving it aside
  would not help, and the learner's data may be fine once the permissions are.
* **One opener at a time.** Checking, moving aside, creating and upgrading the file happen
  under an exclusive lock on ``progress.sqlite3.lock`` (flock / msvcrt), so two instances
  starting together on a bad file move it aside once, not the fresh one too.
* **Append-only log.** Answers are only ever inserted; triggers refuse UPDATE and DELETE.

Standard library only; importing this module costs milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DB_NAME = "progress.sqlite3"
BUSY_TIMEOUT_MS = 15_000
OPEN_LOCK_TIMEOUT_S = 60.0
KINDS = ("full", "review")
_SIDE_FILES = ("-wal", "-shm", "-journal")

# SQLite primary result codes that mean "the bytes are bad", as opposed to "cannot get at
# them" (busy, locked, permissions, I/O): only these justify moving the file aside.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_HEADER = b"SQLite format 3\x00"
_ACCESS_HINT = (
    "Check that you can read and write it and its folder, or set QUANT_TUTOR_HOME to use another folder."
)
_ZEROS = bytes(len(_SQLITE_HEADER))
_GONE = "the file disappeared while being checked"  # another instance moved it: look again


class StoreError(Exception):
    """The progress store cannot do what was asked; the message says why, for a human."""


@dataclass(frozen=True)
class AnswerRecord:
    """One row of the append-only answers log."""

    attempt_id: int
    lesson_id: str
    question_id: str
    choice: str
    correct: bool
    seconds: float
    answered_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class OpenAttempt:
    """An attempt that was neither finished nor abandoned: what "resume?" offers."""

    attempt_id: int
    lesson_id: str
    question_ids: tuple[str, ...]
    answers: dict[str, AnswerRecord]  # by question id; the latest answer to each
    started_at: str
    kind: str  # "full" or "review"

    @property
    def unanswered(self) -> tuple[str, ...]:
        """Question ids not answered yet, in the order the attempt asks them."""
        return tuple(q for q in self.question_ids if q not in self.answers)


@dataclass(frozen=True)
class AttemptInfo:
    """One attempt, in any state."""

    attempt_id: int
    lesson_id: str
    kind: str
    question_ids: tuple[str, ...]
    started_at: str
    finished_at: str | None
    abandoned_at: str | None
    score: int | None  # set when finished

    @property
    def state(self) -> str:
        """One of "open", "finished" or "abandoned"."""
        if self.finished_at is not None:
            return "finished"
        if self.abandoned_at is not None:
            return "abandoned"
        return "open"


@dataclass(frozen=True)
class LessonProgress:
    """Everything remembered about one lesson (defaults for a lesson never opened)."""

    lesson_id: str
    read_fraction: float = 0.0  # 0..1, the most ever reached
    scroll_y: float = 0.0  # last scroll offset, to restore
    steps_done: frozenset[int] = frozenset()
    notes: dict[int, str] = field(default_factory=dict)  # step index -> text (non-empty only)
    best_score: int | None = None  # over finished full attempts
    last_score: int | None = None
    attempts: int = 0  # finished full attempts
    last_opened: str | None = None
    marks: dict[int, tuple[str, ...]] = field(default_factory=dict)  # step index -> doubted sentences


@dataclass(frozen=True)
class LessonSummary:
    """What a list of every lesson shows about one: :meth:`Store.summaries` reads them all at once."""

    read_fraction: float = 0.0
    steps_done: int = 0
    best_score: int | None = None  # over finished full attempts
    last_score: int | None = None
    attempts: int = 0  # finished full attempts


# --- schema ------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _sql_step(*statements: str) -> Migration:
    """A migration made of SQL statements, executed one by one (inside the caller's
    transaction: ``executescript`` would commit it)."""

    def step(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return step


_SCHEMA_V1 = (
    """
    CREATE TABLE attempts (
        attempt_id   INTEGER PRIMARY KEY AUTOINCREMENT,
        lesson_id    TEXT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('full', 'review')),
        question_ids TEXT NOT NULL,  -- JSON array, in the order asked
        started_at   TEXT NOT NULL,
        finished_at  TEXT,
        abandoned_at TEXT,
        score        INTEGER,
        CHECK (finished_at IS NULL OR abandoned_at IS NULL)
    )
    """,
    "CREATE INDEX attempts_by_lesson ON attempts (lesson_id, attempt_id)",
    """
    CREATE TABLE answers (
        answer_id   INTEGER PRIMARY KEY AUTOINCREMENT,
        attempt_id  INTEGER NOT NULL REFERENCES attempts (attempt_id),
        lesson_id   TEXT NOT NULL,
        question_id TEXT NOT NULL,
        choice      TEXT NOT NULL,
        correct     INTEGER NOT NULL CHECK (correct IN (0, 1)),
        seconds     REAL NOT NULL,
        answered_at TEXT NOT NULL
    )
    """,
    "CREATE INDEX answers_by_attempt ON answers (attempt_id, answer_id)",
    "CREATE INDEX answers_by_lesson ON answers (lesson_id, answer_id)",
    """
    CREATE TRIGGER answers_no_update BEFORE UPDATE ON answers
    BEGIN SELECT RAISE(ABORT, 'the answers log is append-only'); END
    """,
    """
    CREATE TRIGGER answers_no_delete BEFORE DELETE ON answers
    BEGIN SELECT RAISE(ABORT, 'the answers log is append-only'); END
    """,
    """
    CREATE TABLE lessons (
        lesson_id     TEXT PRIMARY KEY,
        read_fraction REAL NOT NULL DEFAULT 0,
        scroll_y      REAL NOT NULL DEFAULT 0,
        last_opened   TEXT,
        open_seq      INTEGER  -- grows with every open: orders last_lesson() without clock ties
    )
    """,
    """
    CREATE TABLE steps (
        lesson_id  TEXT NOT NULL,
        step       INTEGER NOT NULL,
        done       INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
        note       TEXT NOT NULL DEFAULT '',
        marks      TEXT NOT NULL DEFAULT '[]',  -- JSON array of sentences the learner doubts
        updated_at TEXT NOT NULL,
        PRIMARY KEY (lesson_id, step)
    )
    """,
)

# MIGRATIONS[i] upgrades user_version i to i + 1. Append; never edit a shipped step.
MIGRATIONS: list[Migration] = [
    _sql_step(*_SCHEMA_V1),
    _sql_step(
        # The learner's settings (the key-terms panel shown or hidden, ...), values as JSON.
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL)",
        # Which parts of the lesson were on screen long enough to read (JSON array of indexes);
        # read_fraction keeps the most ever reached, so older figures stay.
        "ALTER TABLE lessons ADD COLUMN parts_read TEXT NOT NULL DEFAULT '[]'",
    ),
    _sql_step(
        # A library of 1,600 lessons: every lesson's best and last score, and the last lesson
        # opened, read from an index instead of a scan of the whole table each time.
        "CREATE INDEX attempts_finished ON attempts (lesson_id, kind, finished_at, attempt_id) "
        "WHERE finished_at IS NOT NULL",
        "CREATE INDEX lessons_by_open_seq ON lessons (open_seq)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    """``data_dir()/progress.sqlite3``; honours ``QUANT_TUTOR_HOME``."""
    from tutor.paths import data_dir

    return data_dir() / DB_NAME


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on an open file without blocking; False if someone has it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _finite(value: float, low: float, high: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        return low
    return min(high, max(low, value))


class Store:
    """Progress store. Thread-safe: one lock serialises calls on this connection."""

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
        once open, SQLite's own locking is all they need. The lock file stays (deleting
        lock files is its own race); it holds nothing.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(
                f"Cannot create the lock file {lock_path} next to the progress database: {exc}. "
                "Fix the folder's permissions, or set QUANT_TUTOR_HOME to use another folder."
            ) from exc
        try:
            deadline = time.monotonic() + OPEN_LOCK_TIMEOUT_S
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"Another quant-tutor has been opening {self.path} for over "
                        f"{OPEN_LOCK_TIMEOUT_S:.0f} s; try again, or check for a stuck process."
                    )
                time.sleep(0.02)
            try:
                yield
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

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
                self._migrate(conn)
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
            latest = len(MIGRATIONS)
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
            if _is_corruption(exc):
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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        latest = len(MIGRATIONS)
        try:
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) == latest:
                return
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot upgrade the progress database {self.path}: {exc}") from exc
        version = latest
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])  # re-read under the lock
            if version > latest:
                raise StoreError(
                    f"The progress database {self.path} was just upgraded by a newer quant-tutor "
                    f"(schema version {version}; this version understands up to {latest})."
                )
            for step in range(version, latest):
                MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA user_version = {latest}")
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(
                    f"Upgrading the progress database {self.path} from schema version {version} to "
                    f"{latest} failed ({exc}); it was left unchanged."
                ) from exc
            raise

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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def schema_version(self) -> int:
        with self._use() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # --- quiz --------------------------------------------------------------------------

    def start_attempt(self, lesson_id: str, question_ids: Sequence[str], kind: str = "full") -> int:
        """A new attempt at a lesson's quiz (or at a review of some of its questions).

        An earlier open attempt is left as it is: call :meth:`abandon_attempt` when the
        learner declines to resume it.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        ids = [str(q) for q in question_ids]
        if not ids:
            raise ValueError("an attempt needs at least one question")
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate question ids in {ids}")
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO attempts (lesson_id, kind, question_ids, started_at) VALUES (?, ?, ?, ?)",
                (lesson_id, kind, json.dumps(ids), _now()),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def _attempt_row(self, conn: sqlite3.Connection, attempt_id: int) -> AttemptInfo:
        row = conn.execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE attempt_id = ?",
            (attempt_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"There is no quiz attempt {attempt_id} in {self.path}.")
        return _attempt_info(row)

    def record_answer(
        self, attempt_id: int, question_id: str, choice: str, correct: bool, seconds: float
    ) -> AnswerRecord:
        """Append one answer to the log, committed before returning.

        Answering the same question again in an attempt appends another row; the latest
        one counts.
        """
        with self._write() as conn:
            attempt = self._attempt_row(conn, attempt_id)
            if attempt.state != "open":
                raise StoreError(
                    f"Quiz attempt {attempt_id} ({attempt.lesson_id}) is already {attempt.state}; "
                    "start a new attempt to answer again."
                )
            if question_id not in attempt.question_ids:
                raise StoreError(
                    f"Question {question_id!r} is not part of quiz attempt {attempt_id} "
                    f"({attempt.lesson_id}: {', '.join(attempt.question_ids)})."
                )
            record = AnswerRecord(
                attempt_id=attempt_id,
                lesson_id=attempt.lesson_id,
                question_id=question_id,
                choice=str(choice),
                correct=bool(correct),
                seconds=_finite(seconds, 0.0, math.inf),
                answered_at=_now(),
            )
            conn.execute(
                "INSERT INTO answers (attempt_id, lesson_id, question_id, choice, correct, seconds, "
                "answered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.attempt_id,
                    record.lesson_id,
                    record.question_id,
                    record.choice,
                    int(record.correct),
                    record.seconds,
                    record.answered_at,
                ),
            )
            return record

    def finish_attempt(self, attempt_id: int) -> int:
        """Close the attempt and store its score: the questions whose latest answer is correct.

        Finishing an already finished attempt returns its stored score.
        """
        with self._write() as conn:
            attempt = self._attempt_row(conn, attempt_id)
            if attempt.state == "finished":
                assert attempt.score is not None
                return attempt.score
            if attempt.state == "abandoned":
                raise StoreError(f"Quiz attempt {attempt_id} ({attempt.lesson_id}) was abandoned.")
            latest = _latest_by_question(self._answers_of(conn, attempt_id))
            score = sum(1 for q in attempt.question_ids if q in latest and latest[q].correct)
            conn.execute(
                "UPDATE attempts SET finished_at = ?, score = ? WHERE attempt_id = ?",
                (_now(), score, attempt_id),
            )
            return score

    def abandon_attempt(self, attempt_id: int) -> None:
        """Mark an open attempt abandoned (the learner declined to resume). Its answers stay
        in the log. Abandoning twice is harmless; abandoning a finished attempt is an error."""
        with self._write() as conn:
            attempt = self._attempt_row(conn, attempt_id)
            if attempt.state == "finished":
                raise StoreError(f"Quiz attempt {attempt_id} ({attempt.lesson_id}) is already finished.")
            if attempt.state == "open":
                conn.execute(
                    "UPDATE attempts SET abandoned_at = ? WHERE attempt_id = ?", (_now(), attempt_id)
                )

    def open_attempt(self, lesson_id: str) -> OpenAttempt | None:
        """The latest unfinished, unabandoned attempt at this lesson, for "resume?"."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts "
                "WHERE lesson_id = ? AND finished_at IS NULL AND abandoned_at IS NULL "
                "ORDER BY attempt_id DESC LIMIT 1",
                (lesson_id,),
            ).fetchone()
            if row is None:
                return None
            info = _attempt_info(row)
            answers = _latest_by_question(self._answers_of(conn, info.attempt_id))
        return OpenAttempt(
            attempt_id=info.attempt_id,
            lesson_id=info.lesson_id,
            question_ids=info.question_ids,
            answers=answers,
            started_at=info.started_at,
            kind=info.kind,
        )

    def _answers_of(self, conn: sqlite3.Connection, attempt_id: int) -> list[AnswerRecord]:
        rows = conn.execute(
            f"SELECT {_ANSWER_COLUMNS} FROM answers WHERE attempt_id = ? ORDER BY answer_id",
            (attempt_id,),
        ).fetchall()
        return [_answer(r) for r in rows]

    def answers(self, lesson_id: str | None = None) -> list[AnswerRecord]:
        """The answers log, oldest first; all lessons, or one."""
        with self._use() as conn:
            if lesson_id is None:
                rows = conn.execute(f"SELECT {_ANSWER_COLUMNS} FROM answers ORDER BY answer_id").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_ANSWER_COLUMNS} FROM answers WHERE lesson_id = ? ORDER BY answer_id",
                    (lesson_id,),
                ).fetchall()
        return [_answer(r) for r in rows]

    def attempt_answers(self, attempt_id: int) -> list[AnswerRecord]:
        """Every answer given in one attempt, oldest first (repeats included)."""
        with self._read() as conn:
            self._attempt_row(conn, attempt_id)
            return self._answers_of(conn, attempt_id)

    def last_finished_attempt(self, lesson_id: str) -> AttemptInfo | None:
        """The attempt (full or review) at this lesson finished most recently, or None."""
        with self._use() as conn:
            row = conn.execute(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE lesson_id = ? AND finished_at IS NOT NULL "
                "ORDER BY finished_at DESC, attempt_id DESC LIMIT 1",
                (lesson_id,),
            ).fetchone()
        return None if row is None else _attempt_info(row)

    def attempt(self, attempt_id: int) -> AttemptInfo:
        """One attempt's state (open, finished with score, or abandoned)."""
        with self._use() as conn:
            return self._attempt_row(conn, attempt_id)

    def attempts(self, lesson_id: str | None = None) -> list[AttemptInfo]:
        """Every attempt, oldest first; all lessons, or one."""
        sql = f"SELECT {_ATTEMPT_COLUMNS} FROM attempts"
        with self._use() as conn:
            if lesson_id is None:
                rows = conn.execute(sql + " ORDER BY attempt_id").fetchall()
            else:
                rows = conn.execute(sql + " WHERE lesson_id = ? ORDER BY attempt_id", (lesson_id,)).fetchall()
        return [_attempt_info(r) for r in rows]

    # --- lesson state ------------------------------------------------------------------

    def save_note(self, lesson_id: str, step: int, text: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO steps (lesson_id, step, note, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (lesson_id, step) DO UPDATE SET note = excluded.note, "
                "updated_at = excluded.updated_at",
                (lesson_id, int(step), str(text), _now()),
            )

    def set_step_done(self, lesson_id: str, step: int, done: bool) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO steps (lesson_id, step, done, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (lesson_id, step) DO UPDATE SET done = excluded.done, "
                "updated_at = excluded.updated_at",
                (lesson_id, int(step), int(bool(done)), _now()),
            )

    def save_marks(self, lesson_id: str, step: int, marks: Sequence[str]) -> None:
        """Replace the sentences the learner marked as doubtful for this step."""
        if isinstance(marks, str):
            raise TypeError("marks must be a sequence of sentences, not one string")
        payload = json.dumps([str(m) for m in marks], ensure_ascii=False)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO steps (lesson_id, step, marks, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (lesson_id, step) DO UPDATE SET marks = excluded.marks, "
                "updated_at = excluded.updated_at",
                (lesson_id, int(step), payload, _now()),
            )

    def marks(self, lesson_id: str, step: int) -> list[str]:
        with self._use() as conn:
            row = conn.execute(
                "SELECT marks FROM steps WHERE lesson_id = ? AND step = ?", (lesson_id, int(step))
            ).fetchone()
        return [] if row is None else list(json.loads(row[0]))

    def save_reading(self, lesson_id: str, scroll_y: float, fraction: float = 0.0) -> None:
        """Remember the scroll offset; the read fraction only ever grows (clamped to 0..1)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO lessons (lesson_id, scroll_y, read_fraction) VALUES (?, ?, ?) "
                "ON CONFLICT (lesson_id) DO UPDATE SET scroll_y = excluded.scroll_y, "
                "read_fraction = max(read_fraction, excluded.read_fraction)",
                (lesson_id, _finite(scroll_y, 0.0, math.inf), _finite(fraction, 0.0, 1.0)),
            )

    def mark_read(self, lesson_id: str, parts: Iterable[int], of: int) -> float:
        """Add lesson parts the learner had on screen long enough to read; the read fraction
        becomes the share of the ``of`` parts read so far (it never shrinks). Returns it."""
        with self._write() as conn:
            row = conn.execute("SELECT parts_read FROM lessons WHERE lesson_id = ?", (lesson_id,)).fetchone()
            known = set(json.loads(row[0])) if row is not None else set()
            seen = sorted(known | {int(p) for p in parts if 0 <= int(p) < of})
            fraction = _finite(len(seen) / of, 0.0, 1.0) if of > 0 else 0.0
            conn.execute(
                "INSERT INTO lessons (lesson_id, parts_read, read_fraction) VALUES (?, ?, ?) "
                "ON CONFLICT (lesson_id) DO UPDATE SET parts_read = excluded.parts_read, "
                "read_fraction = max(read_fraction, excluded.read_fraction)",
                (lesson_id, json.dumps(seen), fraction),
            )
            return float(
                conn.execute(
                    "SELECT read_fraction FROM lessons WHERE lesson_id = ?", (lesson_id,)
                ).fetchone()[0]
            )

    def setting(self, key: str, default: Any = None) -> Any:
        """One of the learner's settings (as saved by :meth:`save_setting`), or ``default``."""
        with self._use() as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def save_setting(self, key: str, value: Any) -> None:
        """Remember a setting across restarts; ``value`` must be JSON-serialisable."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, json.dumps(value), _now()),
            )

    def touch_lesson(self, lesson_id: str) -> None:
        """The learner opened this lesson now."""
        with self._write() as conn:
            seq = conn.execute("SELECT coalesce(max(open_seq), 0) + 1 FROM lessons").fetchone()[0]
            conn.execute(
                "INSERT INTO lessons (lesson_id, last_opened, open_seq) VALUES (?, ?, ?) "
                "ON CONFLICT (lesson_id) DO UPDATE SET last_opened = excluded.last_opened, "
                "open_seq = excluded.open_seq",
                (lesson_id, _now(), seq),
            )

    def lesson(self, lesson_id: str) -> LessonProgress:
        """Everything known about one lesson; defaults for a lesson never seen."""
        with self._read() as conn:
            return self._lesson(conn, lesson_id)

    def _lesson(self, conn: sqlite3.Connection, lesson_id: str) -> LessonProgress:
        row = conn.execute(
            "SELECT read_fraction, scroll_y, last_opened FROM lessons WHERE lesson_id = ?", (lesson_id,)
        ).fetchone()
        read_fraction, scroll_y, last_opened = row if row is not None else (0.0, 0.0, None)
        done: set[int] = set()
        notes: dict[int, str] = {}
        marks: dict[int, tuple[str, ...]] = {}
        for step, is_done, note, marks_json in conn.execute(
            "SELECT step, done, note, marks FROM steps WHERE lesson_id = ? ORDER BY step", (lesson_id,)
        ):
            if is_done:
                done.add(int(step))
            if note:
                notes[int(step)] = str(note)
            step_marks = tuple(json.loads(marks_json))
            if step_marks:
                marks[int(step)] = step_marks
        count, best = conn.execute(
            "SELECT count(*), max(score) FROM attempts "
            "WHERE lesson_id = ? AND kind = 'full' AND finished_at IS NOT NULL",
            (lesson_id,),
        ).fetchone()
        last = conn.execute(
            "SELECT score FROM attempts WHERE lesson_id = ? AND kind = 'full' AND finished_at IS NOT NULL "
            "ORDER BY finished_at DESC, attempt_id DESC LIMIT 1",
            (lesson_id,),
        ).fetchone()
        return LessonProgress(
            lesson_id=lesson_id,
            read_fraction=float(read_fraction),
            scroll_y=float(scroll_y),
            steps_done=frozenset(done),
            notes=notes,
            best_score=None if best is None else int(best),
            last_score=None if last is None else int(last[0]),
            attempts=int(count),
            last_opened=last_opened,
            marks=marks,
        )

    def all_progress(self) -> dict[str, LessonProgress]:
        """Progress of every lesson the store knows anything about, by lesson id (sorted)."""
        with self._read() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT lesson_id FROM lessons UNION SELECT lesson_id FROM steps "
                    "UNION SELECT lesson_id FROM attempts ORDER BY 1"
                )
            ]
            return {lesson_id: self._lesson(conn, lesson_id) for lesson_id in ids}

    def summaries(self) -> dict[str, LessonSummary]:
        """Every lesson the store knows anything about, summarised, in four grouped queries
        whatever the number of lessons (the Progress tab, ``progress --json``, the Library)."""
        with self._read() as conn:
            read = dict(conn.execute("SELECT lesson_id, read_fraction FROM lessons"))
            steps = dict(
                conn.execute("SELECT lesson_id, count(*) FROM steps WHERE done = 1 GROUP BY lesson_id")
            )
            scores = {
                lesson_id: (int(count), int(best))
                for lesson_id, count, best in conn.execute(
                    "SELECT lesson_id, count(*), max(score) FROM attempts "
                    f"WHERE {_FINISHED_FULL} GROUP BY lesson_id"
                )
            }
            last = dict(
                conn.execute(
                    "SELECT lesson_id, score FROM (SELECT lesson_id, score, row_number() OVER "
                    "(PARTITION BY lesson_id ORDER BY finished_at DESC, attempt_id DESC) AS newest "
                    f"FROM attempts WHERE {_FINISHED_FULL}) WHERE newest = 1"
                )
            )
        return {
            lesson_id: LessonSummary(
                read_fraction=float(read.get(lesson_id, 0.0)),
                steps_done=int(steps.get(lesson_id, 0)),
                best_score=scores[lesson_id][1] if lesson_id in scores else None,
                last_score=None if last.get(lesson_id) is None else int(last[lesson_id]),
                attempts=scores.get(lesson_id, (0, 0))[0],
            )
            for lesson_id in sorted(read.keys() | steps.keys() | scores.keys())
        }

    def last_lesson(self) -> str | None:
        """The lesson opened most recently (by :meth:`touch_lesson`), or None."""
        with self._use() as conn:
            row = conn.execute(
                "SELECT lesson_id FROM lessons WHERE open_seq IS NOT NULL ORDER BY open_seq DESC LIMIT 1"
            ).fetchone()
        return None if row is None else str(row[0])


_FINISHED_FULL = "kind = 'full' AND finished_at IS NOT NULL"
_ANSWER_COLUMNS = "attempt_id, lesson_id, question_id, choice, correct, seconds, answered_at"
_ATTEMPT_COLUMNS = "attempt_id, lesson_id, kind, question_ids, started_at, finished_at, abandoned_at, score"


def _answer(row: tuple[Any, ...]) -> AnswerRecord:
    attempt_id, lesson_id, question_id, choice, correct, seconds, answered_at = row
    return AnswerRecord(
        attempt_id=int(attempt_id),
        lesson_id=str(lesson_id),
        question_id=str(question_id),
        choice=str(choice),
        correct=bool(correct),
        seconds=float(seconds),
        answered_at=str(answered_at),
    )


def _attempt_info(row: tuple[Any, ...]) -> AttemptInfo:
    attempt_id, lesson_id, kind, question_ids, started_at, finished_at, abandoned_at, score = row
    return AttemptInfo(
        attempt_id=int(attempt_id),
        lesson_id=str(lesson_id),
        kind=str(kind),
        question_ids=tuple(json.loads(str(question_ids))),
        started_at=str(started_at),
        finished_at=None if finished_at is None else str(finished_at),
        abandoned_at=None if abandoned_at is None else str(abandoned_at),
        score=None if score is None else int(score),
    )


def _latest_by_question(records: Sequence[AnswerRecord]) -> dict[str, AnswerRecord]:
    latest: dict[str, AnswerRecord] = {}
    for record in records:  # oldest first, so later answers replace earlier ones
        latest[record.question_id] = record
    return latest
