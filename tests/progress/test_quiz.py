"""Quiz sessions: answering by number or letter, scoring, review and resume."""

from __future__ import annotations

import pytest

from tests.conftest import SEED
from tutor.library.content import Library
from tutor.library.models import LETTERS
from tutor.progress.quiz import QuizError, QuizSession, parse_choice
from tutor.progress.store import Store


def test_parse_choice(library: Library) -> None:
    question = library.get(SEED).questions[0]
    assert parse_choice("1", question) == "a"
    assert parse_choice(" B\n", question) == "b"
    for bad in ["0", "5", "e", "", "ab"]:
        with pytest.raises(QuizError, match="not a choice"):
            parse_choice(bad, question)


def test_full_session_scores_and_reviews(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    session = QuizSession(lesson, store)
    for number, question in enumerate(lesson.questions):
        wrong = LETTERS[(question.correct_index + 1) % len(question.choices)]
        feedback = session.answer(question.answer if number % 3 else wrong)
        assert feedback.correct == bool(number % 3)
    assert session.finished
    assert session.score == 6
    assert session.wrong_ids() == [lesson.questions[i].id for i in (0, 3, 6, 9)]
    progress = store.lesson(SEED)
    assert (progress.best_score, progress.last_score, progress.attempts) == (6, 6, 1)

    review = QuizSession.review(lesson, store, session.wrong_ids())
    assert review.total == 4
    for question in review.questions:
        review.answer(question.answer)
    assert review.score == 4
    assert store.lesson(SEED).attempts == 1, "a review is not a new attempt"


def test_resume_continues_at_first_unanswered(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    session = QuizSession(lesson, store)
    for question in lesson.questions[:3]:
        session.answer(question.answer)
    pending = store.open_attempt(SEED)
    assert pending is not None
    resumed = QuizSession(lesson, store, resume=pending)
    assert resumed.attempt_id == session.attempt_id
    assert resumed.index == 3 and resumed.score == 3


def test_resuming_a_fully_answered_attempt_finishes_it(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    attempt = store.start_attempt(SEED, [q.id for q in lesson.questions])
    for question in lesson.questions:  # every answer saved, then killed before the finish
        store.record_answer(attempt, question.id, question.answer, True, 1.0)
    pending = store.open_attempt(SEED)
    assert pending is not None
    session = QuizSession(lesson, store, resume=pending)
    assert session.finished and session.score == 10
    assert store.open_attempt(SEED) is None
    assert store.lesson(SEED).best_score == 10


def test_times_are_said_in_words_in_local_time() -> None:
    from datetime import UTC, datetime, timedelta

    from tutor.text import when

    now = datetime.now().astimezone()
    stamp = now.replace(hour=9, minute=54, second=0, microsecond=0)
    iso = stamp.astimezone(UTC).isoformat()  # stored in UTC, said in local time
    assert when(iso, now) == "today at 09:54"
    assert when((stamp - timedelta(days=1)).astimezone(UTC).isoformat(), now) == "yesterday at 09:54"
    older = stamp.replace(year=now.year - 1, month=1, day=3)
    assert when(older.astimezone(UTC).isoformat(), now) == f"on 3 Jan {now.year - 1} at 09:54"
    assert when("not a time") == "not a time"


def test_three_choice_questions_say_their_own_keys(library: Library) -> None:
    from tutor.progress.quiz import choice_keys

    question = library.get(SEED).questions[0]
    three = question.model_copy(update={"choices": question.choices[:3]})
    assert choice_keys(question) == "1–4 or a–d" and choice_keys(three) == "1–3 or a–c"
    with pytest.raises(QuizError, match="This question has 3 choices: answer 1–3 or a–c"):
        parse_choice("d", three)


def test_last_wrong_answers_come_back_from_the_log(library: Library, store: Store) -> None:
    from tutor.progress.quiz import last_wrong_answers

    lesson = library.get(SEED)
    assert last_wrong_answers(lesson, store) == []
    session = QuizSession(lesson, store)
    for number, question in enumerate(lesson.questions):
        session.answer(question.answer if number % 4 else LETTERS[(question.correct_index + 1) % 4])
    QuizSession(lesson, store).answer(lesson.questions[0].answer)  # unfinished: not the one reviewed
    with Store(store.path) as reopened:  # read back from the file, as after a restart
        wrong = last_wrong_answers(lesson, reopened)
    assert [w.question.id for w in wrong] == session.wrong_ids()
    assert [w.chosen for w in wrong] == [LETTERS[(w.question.correct_index + 1) % 4] for w in wrong]
