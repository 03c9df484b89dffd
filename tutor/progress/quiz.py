"""A quiz session: question order, answering, score and review of wrong answers.

Every answer is written to the store the moment it is given, so a session can be
killed at any point and resumed from :meth:`Store.open_attempt`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tutor.library.models import LETTERS, Lesson, Question
from tutor.progress.records import OpenAttempt
from tutor.progress.store import Store

FULL = "full"
REVIEW = "review"


@dataclass(frozen=True)
class Feedback:
    question: Question
    chosen: str
    correct: bool
    number: int  # 1-based position in this session

    @property
    def correct_letter(self) -> str:
        return self.question.answer

    @property
    def chosen_feedback(self) -> str:
        return self.question.choices[LETTERS.index(self.chosen)].feedback


class QuizError(ValueError):
    pass


def choice_keys(question: Question) -> str:
    """The keys that answer this question: "1–4 or a–d", "1–3 or a–c"."""
    count = len(question.choices)
    return f"1–{count} or a–{LETTERS[count - 1]}"


def not_a_choice(question: Question, verb: str = "answer") -> str:
    """Why a key did not answer, said the same way in plain mode ("answer") and the app ("press")."""
    return f"This question has {len(question.choices)} choices: {verb} {choice_keys(question)}."


def choice_text(question: Question, letter: str) -> str:
    """A choice as the learner saw it: "b) About half the memory"."""
    return f"{letter}) {question.choices[LETTERS.index(letter)].text}"


def parse_choice(key: str, question: Question) -> str:
    """Map '1'-'4' or 'a'-'d' (any case) to a choice letter, or raise QuizError."""
    key = key.strip().lower()
    count = len(question.choices)
    if key.isdigit() and 1 <= int(key) <= count:
        return LETTERS[int(key) - 1]
    if len(key) == 1 and key in LETTERS[:count]:
        return key
    raise QuizError(f"{key!r} is not a choice. {not_a_choice(question)}")


@dataclass(frozen=True)
class WrongAnswer:
    """A question the learner got wrong, and the choice they gave."""

    question: Question
    chosen: str


def last_wrong_answers(lesson: Lesson, store: Store) -> list[WrongAnswer]:
    """The wrong answers of the lesson's last finished attempt, read back from the answers log
    (so they can be reviewed after a restart), in the order the attempt asked them."""
    attempt = store.last_finished_attempt(lesson.id)
    if attempt is None:
        return []
    latest = {record.question_id: record for record in store.attempt_answers(attempt.attempt_id)}
    by_id = {q.id: q for q in lesson.questions}
    return [
        WrongAnswer(by_id[qid], latest[qid].choice)
        for qid in attempt.question_ids
        if qid in by_id and qid in latest and not latest[qid].correct
    ]


class QuizSession:
    """One pass through a lesson's questions (all of them, or the ones last got wrong)."""

    def __init__(
        self,
        lesson: Lesson,
        store: Store,
        questions: list[Question] | None = None,
        kind: str = FULL,
        resume: OpenAttempt | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lesson = lesson
        self.store = store
        self.kind = kind
        self._clock = clock
        by_id = {q.id: q for q in lesson.questions}
        self.results: dict[str, bool] = {}
        if resume is not None:
            self.kind = resume.kind
            self.questions = [by_id[qid] for qid in resume.question_ids if qid in by_id]
            self.attempt_id = resume.attempt_id
            self.results = {qid: rec.correct for qid, rec in resume.answers.items() if qid in by_id}
        else:
            self.questions = list(questions if questions is not None else lesson.questions)
            if not self.questions:
                raise QuizError("there are no questions to ask")
            self.attempt_id = store.start_attempt(lesson.id, [q.id for q in self.questions], kind)
        self.index = next(
            (i for i, q in enumerate(self.questions) if q.id not in self.results), len(self.questions)
        )
        self._shown_at = clock()
        if resume is not None and self.finished:
            # Killed between the last answer and its finish: finish now, or it is offered forever.
            store.finish_attempt(self.attempt_id)

    @classmethod
    def review(cls, lesson: Lesson, store: Store, wrong_ids: list[str]) -> QuizSession:
        wanted = set(wrong_ids)
        return cls(lesson, store, [q for q in lesson.questions if q.id in wanted], kind=REVIEW)

    @property
    def finished(self) -> bool:
        return self.index >= len(self.questions)

    @property
    def current(self) -> Question:
        if self.finished:
            raise QuizError("the quiz is finished")
        return self.questions[self.index]

    @property
    def score(self) -> int:
        return sum(self.results.values())

    @property
    def total(self) -> int:
        return len(self.questions)

    def wrong_ids(self) -> list[str]:
        return [q.id for q in self.questions if self.results.get(q.id) is False]

    def answer(self, key: str) -> Feedback:
        question = self.current
        letter = parse_choice(key, question)
        correct = letter == question.answer
        seconds = max(0.0, self._clock() - self._shown_at)
        self.store.record_answer(self.attempt_id, question.id, letter, correct, seconds)
        self.results[question.id] = correct
        feedback = Feedback(question, letter, correct, self.index + 1)
        self.index += 1
        self._shown_at = self._clock()
        if self.finished:
            self.store.finish_attempt(self.attempt_id)
        return feedback

    def abandon(self) -> None:
        if not self.finished:
            self.store.abandon_attempt(self.attempt_id)
