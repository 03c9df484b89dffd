"""The tutor tab driven with Pilot on the real model (CPU): streaming, switching, cancelling, safety."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
from textual.containers import VerticalScroll
from textual.widgets import Input

from tests.conftest import SEED, until
from tui.app import QuantTutorApp
from tui.tutor_runtime import TutorRuntime, TutorState
from tui.widgets.chat_entry import ChatEntry
from tui.widgets.chat_view import ChatView
from tui.widgets.plain import Plain
from tui.widgets.quiz_view import QuizView
from tutor.assistant.support import SentenceCheck
from tutor.library.content import Library
from tutor.progress.store import Store

pytestmark = pytest.mark.model
SIZE = (100, 40)


def _text(widget: Plain) -> str:
    return str(widget.visual)


def test_with_four_lessons_every_one_is_searched_at_ready(engine_runtime) -> None:  # type: ignore[no-untyped-def]
    status = engine_runtime.client.status()
    assert status["index"] == {"lessons": 4, "total": 4, "done": True, "error": ""}
    changes: list[None] = []
    engine_runtime.follow_index(lambda: changes.append(None))  # nothing to follow: returns at once
    assert engine_runtime.indexing is None and changes == []


async def test_ask_streams_an_answer_with_citations_and_switches_live(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        chat = app.screen.query_one(ChatView)
        assert "tutor bf16" in _text(chat.query_one("#chat-badge", Plain))
        streamed: list[str] = []
        original = ChatEntry.set_text

        def spy(entry: ChatEntry, text: str) -> None:
            streamed.append(text)
            original(entry, text)

        ChatEntry.set_text = spy  # type: ignore[method-assign]
        gc.unfreeze()
        try:
            await pilot.press(*"Is 4-bit good enough for a chatbot?", "enter")
            entry = chat.query(ChatEntry).last()
            await until(pilot, lambda: entry.answer is not None)
            await pilot.pause()
            assert gc.get_freeze_count() > 0, "the finished reply is left out of full collections"
        finally:
            ChatEntry.set_text = original  # type: ignore[method-assign]
            gc.unfreeze()
        answer = entry.answer
        assert answer is not None and answer.grounded and answer.precision == "bf16"
        assert len(streamed) > 1, "the reply was drawn as it streamed, not only at the end"
        assert answer.citations and answer.quote is not None
        quote = _text(entry.query_one(".chat-quote", Plain))
        assert "From the lesson" in quote and answer.quote.text in quote
        assert answer.citations[0].section in _text(entry.query_one(".chat-passage", Plain))
        checks = _text(entry.query_one(".chat-checks", Plain))
        marks = ("✓ supported by the lesson", "? not found in the lesson", "✗ contradicts the lesson")
        assert all(check.mark in checks for check in answer.sentences) and any(m in checks for m in marks)
        assert _text(entry.query_one(".chat-stats", Plain)).startswith("bf16 · TTFT")
        # A contradicting sentence is shown with what the lesson says instead, as text.
        lesson = "NF4 usually preserves quality better than [b]FP4[/b]."
        clash = SentenceCheck("FP4 beats NF4.", False, 0.6, lesson, "the lesson says otherwise", True)
        entry.answer = dataclasses.replace(answer, sentences=[clash])
        entry.reveal_checks()
        shown = _text(entry.query_one(".chat-checks", Plain))
        assert f"✗ contradicts the lesson: FP4 beats NF4.\n   the lesson says: “{lesson}”" in shown
        entry.answer = answer

        # Switch mid-conversation: the conversation stays, the next reply is tagged with the new
        # precision: F9 fp32, then F10 nf4-bf16 (nf4's weights in 16-bit storage, which decodes
        # at bf16's pace on any CPU; the Lab's compare asks at the others).
        await pilot.press("f9")
        await until(pilot, lambda: app.tutor.precision == "fp32" and app.tutor.switching is None)
        await pilot.press("f10")
        await until(pilot, lambda: app.tutor.precision == "nf4-bf16" and app.tutor.switching is None)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(chat.query(ChatEntry)) == 2 and chat.query(ChatEntry).last().answer)
        first, second = chat.query(ChatEntry)
        assert first.answer is answer, "the first answer is still there"
        assert second.answer is not None and second.answer.precision == "nf4-bf16"
        assert _text(second.query_one(".chat-stats", Plain)).startswith("nf4-bf16 · TTFT")
        assert "asked again at nf4-bf16" in _text(second.query(Plain).first())
        assert "tutor nf4-bf16" in _text(chat.query_one("#chat-badge", Plain))
        log = chat.query_one("#chat-log", VerticalScroll)
        await pilot.pause()
        assert 0 < log.max_scroll_y == log.scroll_y, "the log followed the reply to its end"


async def test_a_reply_taller_than_the_view_keeps_its_question_and_quote_in_view(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    # In a small terminal the reply (quote, explanation, checks, cited passage) outgrows the log:
    # following its end would scroll the quote, what the learner reads first, out of view.
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("t")
        chat = app.screen.query_one(ChatView)
        await pilot.press(*"What is NF4?", "enter")
        entry = chat.query(ChatEntry).last()
        await until(pilot, lambda: entry.answer is not None)
        await pilot.pause()
        log = chat.query_one("#chat-log", VerticalScroll)
        view = log.scrollable_content_region.height
        assert entry.outer_size.height > view and not log.is_anchored
        quote = entry.query_one(".chat-quote", Plain)
        top = entry.virtual_region.y
        assert log.scroll_y == top, "the question at the top of the view"
        assert quote.virtual_region.y + quote.outer_size.height <= view, "the quote whole, under it"


async def test_escape_cancels_through_the_engine_and_markup_is_literal(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    question = "What does [bold]NF4[/bold] \x1b[31mquantization do?"
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        chat = app.screen.query_one(ChatView)
        box = chat.query_one("#chat-input")
        box.value = question  # type: ignore[attr-defined]
        await pilot.press("enter")
        whole = chat.query(ChatEntry).last()
        await until(pilot, lambda: whole.answer is not None)
        assert whole.answer is not None and not whole.answer.stats.cancelled

        box.value = question  # type: ignore[attr-defined]
        # Esc at once: the cancel travels to the engine process, even ahead of the question.
        await pilot.press("enter", "escape")
        cut = chat.query(ChatEntry).last()
        await until(pilot, lambda: cut.answer is not None)
        assert cut.answer is not None
        assert cut.answer.stats.stop == "cancelled", "the engine itself says it stopped on the cancel"
        assert cut.answer.stats.tokens < whole.answer.stats.tokens, "the same greedy reply, cut short"
        assert "cancelled" in _text(cut.query_one(".chat-stats", Plain))
        said = _text(cut.query(Plain).first())
        assert "[bold]NF4[/bold]" in said and "\x1b" not in said and "[31m" not in said


async def test_off_topic_is_declined_without_the_model(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t", *"How long should I boil an egg?", "enter")
        chat = app.screen.query_one(ChatView)
        entry = chat.query(ChatEntry).last()
        await until(pilot, lambda: entry.answer is not None, 30)
        assert entry.answer is not None and not entry.answer.grounded and entry.answer.generated == ""
        assert "doesn't cover" in _text(entry.query_one(".chat-quote", Plain))

        # ↑/↓ walk back and forth through what was asked; past the newest the box is empty again.
        await pilot.press(*"Who won the 1998 World Cup?", "enter")
        await until(pilot, lambda: chat.query(ChatEntry).last().answer is not None, 30)
        box = chat.query_one("#chat-input", Input)
        seen = []
        for key in ("up", "up", "up", "down", "down"):
            await pilot.press(key)
            seen.append(box.value)
            assert box.cursor_position == len(box.value), "the cursor waits at the end of the recalled text"
        assert seen == [
            "Who won the 1998 World Cup?",
            "How long should I boil an egg?",
            "How long should I boil an egg?",
            "Who won the 1998 World Cup?",
            "",
        ]


async def test_practice_and_quiz_open_the_tutor_prefilled(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    lesson = library.get(SEED)
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("p")
        app.screen.query_one("#ask-1").focus()  # below step 2's question, maybe off screen
        await pilot.press("enter")
        chat = app.screen.query_one(ChatView)
        box = chat.query_one("#chat-input")
        assert box.value == lesson.meta.practice[1].tutor_question  # type: ignore[attr-defined]
        assert app.focused is box
        await pilot.press("escape", "q")
        await pilot.press("enter", lesson.questions[0].answer, "e")
        assert lesson.questions[0].stem in box.value  # type: ignore[attr-defined]


async def test_lesson_and_quiz_respond_while_the_model_loads(
    library: Library, store: Store, model_cache: Path
) -> None:
    # Its own engine process, loading (seconds, or tens of seconds if it converts first).
    runtime = TutorRuntime(library, cache_dir=model_cache)
    app = QuantTutorApp(library, store, tutor=runtime)
    lesson = library.get(SEED)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        await until(pilot, lambda: runtime.state is TutorState.LOADING, 10)
        await pilot.press("escape", "q", "enter")  # Esc leaves the question box; q opens the quiz
        states = []
        for question in lesson.questions[:3]:
            await pilot.press(question.answer)
            states.append(runtime.state)
            await pilot.press("enter")
        quiz = app.screen.query_one(QuizView)
        assert quiz.session is not None and quiz.session.score == 3
        assert states[0] is TutorState.LOADING, "the quiz answered while the model was still loading"
        await pilot.press("l")
        if runtime.state is TutorState.LOADING:
            assert "tutor loading" in _text(app.screen.query_one("#status-progress", Plain))
    runtime.stop()  # mid-load: the engine process goes with it (readiness: the other tests)


async def test_step_one_doubts_are_marked_then_revealed_and_saved(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    from textual.widgets import SelectionList

    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("p")
        await pilot.click("#ask-0")
        await pilot.press("enter")
        chat = app.screen.query_one(ChatView)
        entry = chat.query(ChatEntry).last()
        await until(pilot, lambda: entry.answer is not None and bool(entry.query(SelectionList)))
        assert entry.answer is not None and entry.answer.sentences
        assert _text(entry.query_one(".chat-checks", Plain)) == "", "the check stays hidden until revealed"
        await pilot.press("space", "v")
        checks = _text(entry.query_one(".chat-checks", Plain))
        assert "(you doubted this)" in checks
        assert store.lesson(SEED).marks == {0: (entry.answer.sentences[0].text,)}
