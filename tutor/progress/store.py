"""The learner's progress: quiz attempts and their append-only answers, practice steps and
notes, reading, settings and the last lesson opened, each call its own short transaction on
the file :class:`tutor.progress.database.Database` opens safely."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from tutor.progress.database import Database
from tutor.progress.errors import StoreError
from tutor.progress.records import AnswerRecord, AttemptInfo, LessonProgress, LessonSummary, OpenAttempt

KINDS = ("full", "review")
_StepColumn = Literal["note", "done", "marks"]  # what one call sets in a practice step's row


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _finite(value: float, low: float, high: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        return low
    return min(high, max(low, value))


class Store(Database):
    """Progress store. Thread-safe: one lock serialises calls on this connection."""

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
                f"INSERT INTO answers ({_ANSWER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
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

    # --- lesson state ------------------------------------------------------------------

    def save_note(self, lesson_id: str, step: int, text: str) -> None:
        self._save_step(lesson_id, step, "note", str(text))

    def set_step_done(self, lesson_id: str, step: int, done: bool) -> None:
        self._save_step(lesson_id, step, "done", int(bool(done)))

    def save_marks(self, lesson_id: str, step: int, marks: Sequence[str]) -> None:
        """Replace the sentences the learner marked as doubtful for this step."""
        if isinstance(marks, str):
            raise TypeError("marks must be a sequence of sentences, not one string")
        self._save_step(lesson_id, step, "marks", json.dumps([str(m) for m in marks], ensure_ascii=False))

    def _save_step(self, lesson_id: str, step: int, column: _StepColumn, value: str | int) -> None:
        """Set one field of a practice step's row, creating the row with the others at their defaults."""
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO steps (lesson_id, step, {column}, updated_at) VALUES (?, ?, ?, ?) "
                f"ON CONFLICT (lesson_id, step) DO UPDATE SET {column} = excluded.{column}, "
                "updated_at = excluded.updated_at",
                (lesson_id, int(step), value, _now()),
            )

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
                f"SELECT count(*), max(score) FROM attempts WHERE lesson_id = ? AND {_FINISHED_FULL}",
                (lesson_id,),
            ).fetchone()
            last = conn.execute(
                f"SELECT score FROM attempts WHERE lesson_id = ? AND {_FINISHED_FULL} "
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
