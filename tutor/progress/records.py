"""What the progress store gives back: plain frozen records."""

from __future__ import annotations

from dataclasses import dataclass, field

from tutor.library.models import QUIZ_LENGTH


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


MARK_WIDTH = len(f"quiz {QUIZ_LENGTH}/{QUIZ_LENGTH}")


def progress_mark(summary: LessonSummary | None) -> str:
    """A lesson's progress in a word or two (at most MARK_WIDTH characters), for lists: the best
    quiz score, else how much was read, else "new". Words, never only a colour."""
    if summary is not None and summary.best_score is not None:
        return f"quiz {summary.best_score}/{QUIZ_LENGTH}"
    if summary is not None and (summary.read_fraction > 0 or summary.steps_done):
        return f"read {round(summary.read_fraction * 100)}%"
    return "new"
