"""The app driven with Pilot: lesson → practice → quiz → score → review, and what survives a restart."""

from __future__ import annotations

import gc
import re

import pytest
from rich.terminal_theme import SVG_EXPORT_THEME
from textual.containers import VerticalScroll
from textual.widgets import Checkbox, Markdown, TabbedContent, TextArea
from textual.widgets._markdown import MarkdownParagraph, MarkdownTable

from tests.conftest import SEED, UnloadedTutor, palette
from tui.app import QuantTutorApp
from tui.commands import LessonCommands, StudyCommands
from tui.screens.study import StudyScreen
from tui.screens.too_small import TooSmallScreen
from tui.widgets.lesson_view import LessonView
from tui.widgets.plain import Plain
from tui.widgets.quiz_view import QuizView
from tutor.library.content import Library
from tutor.library.models import LETTERS
from tutor.progress.store import Store

SIZE = (80, 24)


def _wrong(question) -> str:  # type: ignore[no-untyped-def]
    return LETTERS[(question.correct_index + 1) % len(question.choices)]


def _calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[tuple[tuple, dict]]:  # type: ignore[type-arg]
    """Every call of ``owner.name`` from now on, as (args, kwargs); the method still runs."""
    calls: list[tuple[tuple, dict]] = []  # type: ignore[type-arg]
    original = getattr(owner, name)

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def _study(app: QuantTutorApp) -> StudyScreen:
    assert isinstance(app.screen, StudyScreen)
    return app.screen


async def test_the_first_frame_is_left_out_of_full_collections(library: Library, store: Store) -> None:
    """What the app built for its first frame lives as long as the app: the cyclic collector's
    full passes (up to 162 ms mid-reply before, delaying key presses) skip it."""
    gc.unfreeze()
    try:
        app = QuantTutorApp(library, store)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


async def test_lesson_practice_quiz_score_review(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        study = _study(app)
        assert study.lesson.id == SEED
        headings = [title for _level, title, _id in study.query_one(Markdown).table_of_contents]
        assert "What quantization cannot do" in headings

        # Practice: notes are saved as typed, literally; done is said in words.
        await pilot.press("p")
        await pilot.press("tab")
        assert isinstance(app.focused, TextArea) and app.focused.id == "note-0"
        await pilot.press(*"int8 [bold]sure[/bold]?")
        assert store.lesson(SEED).notes[0] == "int8 [bold]sure[/bold]?"
        await pilot.press("escape")
        study.query_one("#done-0", Checkbox).value = True
        await pilot.pause()
        assert store.lesson(SEED).steps_done == frozenset({0})
        assert "✓ Done" in str(study.query_one("#done-0", Checkbox).label)
        assert "1/3 steps" in study.status_text

        # Quiz: keys 1-4 and a-d, immediate feedback, a score at the end.
        await pilot.press("q")
        quiz = study.query_one(QuizView)
        assert app.focused is quiz
        await pilot.press("enter")
        for number, question in enumerate(lesson.questions):
            assert f"Question {number + 1} of 10" in str(study.query_one("#quiz-status", Plain).visual)
            right = number % 4 != 0
            letter = question.answer if right else _wrong(question)
            await pilot.press(str(LETTERS.index(letter) + 1) if number % 2 else letter)
            text = quiz.body_text
            assert ("✓ Correct." in text) == right and ("✗ Not quite." in text) == (not right)
            assert question.explanation in text and question.source in text
            await pilot.press("enter")
        status = study.query_one("#quiz-status", Plain)
        assert str(status.visual) == "Score: 7/10 · best 7/10" and "Score" not in quiz.body_text, "said once"
        assert store.lesson(SEED).best_score == 7
        assert "best 7/10" in study.status_text

        # Review my wrong answers, then retry just those.
        await pilot.press("w")
        review = quiz.body_text
        wrong = [q for i, q in enumerate(lesson.questions) if i % 4 == 0]
        assert review.count("✗ You answered") == len(wrong)
        for question in wrong:
            assert question.stem in review
        await pilot.press("enter")
        for question in wrong:
            await pilot.press(question.answer, "enter")
        assert f"Review score: {len(wrong)}/{len(wrong)}" in str(status.visual)
        assert store.lesson(SEED).attempts == 1


async def test_feedback_jumps_to_the_source_section(library: Library, store: Store) -> None:
    lesson = library.get(SEED)
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q", "enter", lesson.questions[0].answer, "j")
        await pilot.pause(0.2)
        study = _study(app)
        assert study.query_one(TabbedContent).active == "lesson"
        scroll = study.query_one("#lesson-scroll", VerticalScroll)
        assert scroll.scroll_y > 0, "the source section was scrolled into view"


async def test_reading_position_and_lesson_are_remembered(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        scroll = _study(app).query_one("#lesson-scroll", VerticalScroll)
        scroll.scroll_to(y=30, animate=False, immediate=True)
        await pilot.pause(1.7)  # long enough to read what is on screen
        await pilot.press("r", "enter")  # open the first related lesson
        await pilot.pause()
        assert _study(app).lesson.id == library.get(SEED).meta.related[0]
    saved = store.lesson(SEED)
    assert saved.scroll_y == 30 and 0 < saved.read_fraction < 1
    assert store.last_lesson() == library.get(SEED).meta.related[0]

    app2 = QuantTutorApp(library, store, lesson_id=SEED)
    async with app2.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        assert _study(app2).query_one("#lesson-scroll", VerticalScroll).scroll_y == 30


async def test_too_small_notice_and_quit(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=(70, 20)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, TooSmallScreen)
        assert "Terminal too small" in str(app.screen.query_one(Plain).visual)
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert isinstance(app.screen, StudyScreen)
        await pilot.resize_terminal(79, 24)
        await pilot.pause()
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_every_action_is_in_the_command_palette(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        titles = await palette(app)
        for title in [
            "Go to Lesson",
            "Go to Practice",
            "Go to Quiz",
            "Go to Library",
            "Go to Progress",
            "Toggle key terms",
            "Quiz: new attempt",
            "Quiz: continue",
            "Quiz: read the question's section",
            "Practice: mark step 1 done / not done",
            "Quit",
        ]:
            assert title in titles, title
        # The study screen's commands are its own provider's; the app's system commands keep
        # only Textual's app-wide ones.
        system = {c.title for c in app.get_system_commands(app.screen)}
        assert "Quit" in system and not {t for t in system if t.startswith(("Go to", "Quiz:", "Tutor:"))}
        study = StudyCommands(app.screen)
        found = [hit async for hit in study.search("switch to int8")]
        assert max(found, key=lambda hit: hit.score).text == "Tutor: switch to int8"
        assert titles["Tutor: switch to int8"].help == "Requantize the tutor's model live (F6)"
        lessons = LessonCommands(app.screen)
        for other in library.lessons.values():  # searched in the library index, not listed one by one
            hits = [hit async for hit in lessons.search(f"open lesson {other.title}")]
            assert hits and hits[0].text == f"Open lesson: {other.title}"
        related = [hit.text async for hit in lessons.discover()]
        assert related == [f"Open lesson: {library.lessons[i].title}" for i in library.get(SEED).meta.related]
        titles["Go to Quiz"].command()
        await pilot.pause()
        assert _study(app).query_one(TabbedContent).active == "quiz"
        titles["Go to Lesson"].command()
        await pilot.pause()
        titles["Quiz: continue"].command()  # shows the quiz tab, then starts the quiz there
        await pilot.pause()
        assert _study(app).query_one(TabbedContent).active == "quiz"
        assert _study(app).query_one(QuizView).session is not None
        titles["Practice: mark step 2 done / not done"].command()
        await pilot.pause()
        assert store.lesson(SEED).steps_done == frozenset({1})


async def test_the_palette_runs_a_study_command_typed_into_it(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store, tutor=UnloadedTutor(library))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p", *"go to progress")
        for _ in range(100):  # the palette searches in a worker
            await pilot.pause(0.05)
            if app.screen.query("CommandList") and app.screen.query_one("CommandList").option_count:
                break
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, StudyScreen)
        assert app.screen.query_one(TabbedContent).active == "progress"


async def test_text_is_shown_literally(library: Library, store: Store) -> None:
    store.save_note(SEED, 0, "\x1b[31mred\x1b[0m [bold]not bold[/bold]")
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        widget = Plain("[b]x[/b] \x1b]0;title\x07y")
        await _study(app).mount(widget)
        assert str(widget.visual) == "[b]x[/b] y"
        await pilot.press("p")
        note = _study(app).query_one("#note-0", TextArea)
        assert note.text == "\x1b[31mred\x1b[0m [bold]not bold[/bold]"  # the learner's text is kept exactly
        assert isinstance(_study(app).query_one(LessonView), LessonView)


PASSAGE = "[link=https://x.test]passage[/link]\n\n| bits | levels |\n|---|---|\n| 4 | 16 |"


async def test_model_text_is_inert(library: Library, store: Store) -> None:
    """Markup, an OSC 8 hyperlink, ANSI colour and a Markdown link from the model stay plain text."""
    from tui.widgets.chat_entry import ChatEntry
    from tui.widgets.chat_view import ChatView

    app = QuantTutorApp(library, store, tutor=UnloadedTutor(library))
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("t")
        chat = _study(app).query_one(ChatView)
        entry = ChatEntry("q", "", None)
        await chat.query_one("#chat-log").mount(entry)
        prepared = {
            "question": "q",
            "question_cut": False,
            "grounded": True,
            "decline": None,
            "quote": {"text": "[i]quoted[/i]", "section": "S", "lesson": SEED, "title": "T"},
            "citations": [
                {
                    "title": "T",
                    "section": "S",
                    "text": PASSAGE,
                }
            ],
        }
        entry.show_prepared(prepared, "bf16")
        evil = (
            "[bold]Bold?[/bold] \x1b]8;;https://evil.test\x1b\\click\x1b]8;;\x1b\\ "
            "\x1b[31mred\x1b[0m [a link](https://evil.test)"
        )
        entry.set_text(evil)
        await pilot.pause()
        shown = entry.query_one(".chat-model", Plain).visual
        assert str(shown) == "[bold]Bold?[/bold] click red [a link](https://evil.test)"
        assert not any(span.style for span in shown.spans), "no style or link was applied"
        assert "[i]quoted[/i]" in str(entry.query_one(".chat-quote", Plain).visual)
        passage = entry.query_one(".chat-passage-text", Markdown)
        await pilot.pause()
        assert passage.source == PASSAGE and passage.query(MarkdownTable), "its table is drawn as a table"
        assert "[link=https://x.test]passage[/link]" in str(passage.query_one(MarkdownParagraph)._content)
        assert not passage._open_links, "a link in it would not open"


async def test_a_lesson_link_to_a_tab_opens_it(library: Library, store: Store) -> None:
    """The lesson's "[open the Precision lab](quant-tutor:lab)" shows the Lab."""
    app = QuantTutorApp(library, store, tutor=UnloadedTutor(library))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        lesson = _study(app).query_one(LessonView)
        markdown = lesson.query_one(Markdown)
        markdown.post_message(Markdown.LinkClicked(markdown, "quant-tutor:lab"))  # as a click posts it
        await pilot.pause()
        assert _study(app).query_one(TabbedContent).active == "lab"


async def test_k_hides_and_shows_the_key_terms(library: Library, store: Store) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        panel = _study(app).query_one("#key-terms")
        lesson = _study(app).query_one("#lesson-scroll")
        wide = lesson.size.width
        assert panel.display and panel.size.width > 0
        await pilot.press("k")
        assert not panel.display and lesson.size.width > wide, "the lesson takes the freed width"
        await pilot.press("k")
        assert panel.display and lesson.size.width == wide
        await pilot.press("k")
    again = QuantTutorApp(library, store)
    async with again.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert not _study(again).query_one("#key-terms").display, "hidden stays hidden after a restart"


async def test_no_color_draws_in_monochrome_and_says_right_and_wrong_in_words(
    library: Library, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    lesson = library.get(SEED)
    app = QuantTutorApp(library, store)
    async with app.run_test(size=SIZE) as pilot:
        assert app.no_color
        first, second = lesson.questions[:2]
        await pilot.press("q", "enter", _wrong(first))
        quiz = _study(app).query_one(QuizView)
        assert "✗ Not quite." in quiz.body_text and f"The answer is {first.answer})" in quiz.body_text
        await pilot.press("enter", second.answer)
        assert "✓ Correct." in quiz.body_text
        # What is drawn has no hue: every colour on screen is a grey (the monochrome filter).
        svg = re.sub(r"<circle[^>]*>", "", app.export_screenshot())  # the window frame's three dots
        colours = set(re.findall(r"#([0-9a-f]{6})\b", svg, re.IGNORECASE))
        colours.discard(SVG_EXPORT_THEME.foreground_color.hex[1:])  # the SVG's own default, not the app's
        assert colours and all(c[0:2] == c[2:4] == c[4:6] for c in colours), colours


async def test_focus_restyles_the_lesson_scroll_alone(
    library: Library, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Textual restyles a focused widget's descendants; the lesson's Markdown is hundreds of them."""
    app = QuantTutorApp(library, store)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        lesson = _study(app).query_one("#lesson-scroll")
        assert len(list(lesson.walk_children())) > 50
        calls = _calls(monkeypatch, app.stylesheet, "update_nodes")
        await pilot.press("q")
        await pilot.press("l")
        await pilot.pause()
        restyled = [node for (nodes, *_), _kwargs in calls for node in nodes]
        assert app.focused is lesson
        assert not [n for n in restyled if n in set(lesson.walk_children())]
        assert lesson in restyled, "its own focus styles still apply"


async def test_plain_lays_out_only_when_its_height_changes(
    library: Library, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = QuantTutorApp(library, store)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        plain = _study(app).query_one(".lesson-meta", Plain)
        calls = _calls(monkeypatch, plain, "refresh")
        plain.show("one line, the same height")
        await pilot.pause()
        layouts = [kwargs.get("layout", False) for _args, kwargs in calls]
        assert layouts and not any(layouts)
        assert "the same height" in str(plain.visual)
        calls.clear()
        plain.show("three\nlines\nnow")
        await pilot.pause()
        layouts = [kwargs.get("layout", False) for _args, kwargs in calls]
        assert any(layouts) and plain.size.height == 3
