"""The progress database's schema, as the steps that build it.

``PRAGMA user_version`` holds the schema version; ``MIGRATIONS[i]`` takes the database from
version ``i`` to ``i + 1`` (:class:`tutor.progress.database.Database` runs the pending ones in
one transaction). A new schema version appends a step; never edit a step that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]


def sql_step(*statements: str) -> Migration:
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
    sql_step(*_SCHEMA_V1),
    sql_step(
        # The learner's settings (the key-terms panel shown or hidden, ...), values as JSON.
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL)",
        # Which parts of the lesson were on screen long enough to read (JSON array of indexes);
        # read_fraction keeps the most ever reached, so older figures stay.
        "ALTER TABLE lessons ADD COLUMN parts_read TEXT NOT NULL DEFAULT '[]'",
    ),
    sql_step(
        # A library of 1,600 lessons: every lesson's best and last score, and the last lesson
        # opened, read from an index instead of a scan of the whole table each time.
        "CREATE INDEX attempts_finished ON attempts (lesson_id, kind, finished_at, attempt_id) "
        "WHERE finished_at IS NOT NULL",
        "CREATE INDEX lessons_by_open_seq ON lessons (open_seq)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
