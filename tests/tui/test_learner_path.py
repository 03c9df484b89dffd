"""Issue 15 at 80×24, as a learner meets it: focus after leaving a note, quiz feedback that keeps
the next action in view, review after a restart, a new attempt that asks first, the header."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
from textual.widgets import TextArea

from tests.conftest import SEED, palette, until
from tui.app import QuantTutorApp
from tui.screens.confirm import ConfirmDiscard
from tui.screens.study import StudyScreen
from tui.widgets import lesson_view
from tui.widgets.plain import Plain
from tui.widgets.practice_view import DoneBox, PracticeView
from tui.widgets.quiz_view import QuizView
from tutor.library.content import Library
from tutor.library.models import LETTERS
from tutor.progress.quiz import QuizSession
from tutor.progress.store import Store

SIZE = (80, 24)


def _study(app: QuantTutorApp) -> StudyScreen:
    assert isinstance(app.screen, StudyScreen)
    return app.screen


def _wrong(question) -> str:  # type: ignore[no-untyped-def]
    return LETTERS[(question.correct_index + 1) % len(question.choices)]


def _on_screen(app: QuantTutorApp, widget: Plain) -> str:
    """The text the terminal shows for ``widget`` (every row of it that is on screen)."""
    region = widget.region
    assert region.height > 0 and app.screen.region.contains_region(region), "it is inside the screen"
    widget_at = {app.screen.get_widget_at(region.x, y)[0] for y in range(region.y, region.bottom)}
    assert widget_at == {widget}, "nothing covers it"
    return str(widget.visual)


async def test_esc_in_a_later_step_stays_at_that_step(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("p")
        practice = _study(app).query_one(PracticeView)
        note = practice.query_one("#note-2", TextArea)
        note.focus()
        await pilot.press(*"my doubt")
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is practice.query_one("#done-2", DoneBox), "Esc goes to this step's done box"
        assert practice.scroll_y > 0, "the view stayed at step 3"
        space = app.screen.active_bindings["space"].binding
        assert space.show and space.description == "Done / not done", "the footer says what Space does"
        await pilot.press("enter")
        assert store.lesson(SEED).steps_done == frozenset({2}), "Enter marks the step done"
        assert store.lesson(SEED).notes == {2: "my doubt"}, "and types nothing into any note"
        await pilot.press("tab")
        assert app.focused is not practice.query_one("#note-0"), "Tab does not jump back to step 1"
        assert practice.scroll_y > 0


async def test_wrong_answer_feedback_keeps_the_next_action_in_view(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    longest = max(range(10), key=lambda i: len(lesson.questions[i].explanation + lesson.questions[i].stem))
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q", "enter")
        for question in lesson.questions[:longest]:
            await pilot.press(question.answer, "enter")
        await pilot.press(_wrong(lesson.questions[longest]))
        await pilot.pause()
        quiz = _study(app).query_one(QuizView)
        assert "✗ Not quite." in quiz.body_text
        assert quiz.max_scroll_y > 0, "the feedback is longer than the screen (the case that hid it)"
        assert "Enter: next question" in _on_screen(app, quiz.query_one("#quiz-keys", Plain))


async def test_wrong_answers_can_be_reviewed_after_a_restart(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    session = QuizSession(lesson, store)
    for number, question in enumerate(lesson.questions):
        session.answer(_wrong(question) if number in (1, 4) else question.answer)
    app = QuantTutorApp(library, Store(store.path))  # a new app on the saved file
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        quiz = _study(app).query_one(QuizView)
        assert "w: review my wrong answers" in str(quiz.query_one("#quiz-keys", Plain).visual)
        await pilot.press("w")
        review = quiz.body_text
        for number in (1, 4):
            question = lesson.questions[number]
            assert question.stem in review
            assert f"✗ You answered {_wrong(question)}) " in review
        assert review.count("✗ You answered") == 2
        assert "Reviewing 2 wrong answers" in str(quiz.query_one("#quiz-status", Plain).visual)
        await pilot.press("l")
        review_command = (await palette(app))["Quiz: review my wrong answers"]
        review_command.command()
        await pilot.pause()
        assert quiz.body_text == review, "the palette command opens the same review"


async def test_new_attempt_over_unfinished_answers_asks_first(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q", "enter")
        for question in lesson.questions[:2]:
            await pilot.press(question.answer, "enter")
        pending = store.open_attempt(SEED)
        assert pending is not None and len(pending.answers) == 2

        new_attempt = (await palette(app))["Quiz: new attempt"].command
        new_attempt()
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDiscard)
        assert "2 of 10 answered" in str(app.screen.query_one("#confirm-question", Plain).visual)
        await pilot.press("enter")  # the focused button keeps it
        await pilot.pause()
        kept = store.open_attempt(SEED)
        assert not isinstance(app.screen, ConfirmDiscard)
        assert kept is not None and kept.attempt_id == pending.attempt_id and len(kept.answers) == 2

        new_attempt()
        await pilot.pause()
        await pilot.press("d")
        await pilot.pause()
        fresh = store.open_attempt(SEED)
        assert fresh is not None and fresh.attempt_id != pending.attempt_id and not fresh.answers
        with closing(sqlite3.connect(store.path)) as conn:
            [(abandoned_at,)] = conn.execute(
                "SELECT abandoned_at FROM attempts WHERE attempt_id = ?", (pending.attempt_id,)
            )
        assert abandoned_at is not None, "the unfinished attempt was set aside"
        assert "Question 1 of 10" in str(_study(app).query_one("#quiz-status", Plain).visual)


async def test_keys_that_do_nothing_say_why(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    three = next(i for i, q in enumerate(lesson.questions) if len(q.choices) == 3)
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q", "w")
        await pilot.press("enter", "enter")
        await pilot.pause()
        for question in lesson.questions[:three]:
            await pilot.press(question.answer, "enter")
        await pilot.press("d", "5", "x")
        await pilot.pause()
        said = [n.message for n in app._notifications]
        assert said[0].startswith("Nothing to review yet")
        assert said[1] == "Answer first: press 1–4 or a–d."
        assert said[2:] == ["This question has 3 choices: press 1–3 or a–c."] * 3
        assert _study(app).query_one(QuizView).state == "asking"


def _row_text(widget: Plain) -> str:
    """What the terminal shows on the widget's first row."""
    return widget.render_line(0).text.rstrip()


async def test_header_cuts_a_long_title_with_an_ellipsis_and_keeps_the_figures(
    library: Library, store: Store
) -> None:
    lesson = max(library.ordered(), key=lambda x: len(x.title))
    store.set_step_done(lesson.id, 0, True)
    app = QuantTutorApp(library, store, lesson_id=lesson.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        study = _study(app)
        title = _row_text(study.query_one("#status-title", Plain))
        figures = _row_text(study.query_one("#status-progress", Plain))
        assert len(lesson.title) + len(figures) > 78, "the header does not fit whole at 80 columns"
        assert title.endswith("…") and lesson.title.startswith(title[:-1]), title
        assert figures == " · read 0% · 1/3 steps · quiz not taken", "the figures are never cut"
        assert study.status_text == lesson.title + figures
        await pilot.resize_terminal(140, 24)
        await pilot.pause()
        assert _row_text(study.query_one("#status-title", Plain)) == lesson.title, "whole when it fits"


async def test_progress_table_uses_the_width_it_has(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=(100, 24)) as pilot:
        await pilot.press("g")
        await pilot.pause()
        table = _study(app).query_one("#progress-table")
        rows = [table.render_line(y).text for y in range(1, 1 + len(library.lessons))]
        titles = [lesson.title for lesson in library.ordered()]
        for row, title in zip(rows, titles, strict=True):
            shown = row.split("  ")[0].strip()
            assert shown == title or (shown.endswith("…") and title.startswith(shown[:-1])), row
        assert "Quantization Tradeoffs (Q4 Vs Q8) For Hermes " in "".join(rows), "cut only when it must be"


async def test_reading_counts_what_stayed_on_screen_not_a_jump_to_the_end(
    library: Library, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lesson_view, "READ_DWELL_S", 1.0)  # the rule, on a shorter clock
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        # The top of the lesson, on screen long enough to read (waited for: start-up varies).
        await until(pilot, lambda: store.lesson(SEED).read_fraction > 0, 20)
        top = store.lesson(SEED).read_fraction
        assert top < 0.3
        await pilot.press("end")
        await pilot.pause(0.1)
        await pilot.press("p")  # gone before it could be read
        await pilot.pause(1.3)
        assert store.lesson(SEED).read_fraction == top, "End alone reads nothing"
        await pilot.press("l")
        await until(pilot, lambda: store.lesson(SEED).read_fraction > top, 20)
        after = store.lesson(SEED).read_fraction
        assert top < after < 0.6, "the end counts once it stayed on screen, the middle still unread"
        assert f"read {round(after * 100)}%" in _study(app).status_text
