"""A generated library of hundreds of lessons: start-up reads the cached index only, the index
follows a changed lesson, a broken lesson still names its file and line, the Library tab
finds a lesson among them, and the tutor's first question embeds only its lesson and the
related ones (the rest are indexed in the background)."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import UnloadedTutor
from tui.app import QuantTutorApp
from tui.widgets.library_view import LibraryView
from tutor import cli
from tutor.assistant.chunks import lesson_and_related
from tutor.assistant.retrieval import Retriever
from tutor.library import content
from tutor.library.content import Library, index_path, load_library
from tutor.library.models import QUIZ_LENGTH, ContentFileError
from tutor.library.sample_library import TRACKS, generate_library
from tutor.progress.store import Store

COUNT = 300


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("library") / "content"
    generate_library(root, COUNT)
    return root


@pytest.fixture
def big(generated: Path, tmp_path: Path) -> Path:
    """A copy of the generated library this test may change."""
    root = tmp_path / "content"
    shutil.copytree(generated, root)
    return root


def _set_title(lesson_md: Path, title: str) -> None:
    text = re.sub(r"^title: .*$", f"title: {json.dumps(title)}", lesson_md.read_text(), count=1, flags=re.M)
    lesson_md.write_text(text)


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    calls: list[object] = []
    real = getattr(content, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(content, name, counted)
    return calls


def test_start_up_reads_the_index_not_the_lessons(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bodies = _count_calls(monkeypatch, "parse_sections")
    quizzes = _count_calls(monkeypatch, "_read_quiz")
    fronts = _count_calls(monkeypatch, "read_front_matter")
    cold = load_library(big)
    assert len(cold.lessons) == COUNT and cold.errors == []
    assert (len(fronts), len(bodies), len(quizzes)) == (COUNT, 0, 0), "cold: front matter only"
    assert index_path(big).is_file()

    warm = load_library(big)
    assert warm.lessons == cold.lessons
    assert (len(fronts), len(bodies), len(quizzes)) == (COUNT, 0, 0), "warm: nothing but the index"

    lesson = warm.get(next(iter(warm.lessons)))  # opening one parses that one
    assert lesson.sections and len(lesson.questions) == QUIZ_LENGTH
    assert (len(bodies), len(quizzes)) == (1, 1)


def test_index_follows_one_changed_lesson(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_library(big)
    changed = sorted(big.iterdir())[7]
    lesson_md = changed / "lesson.md"
    _set_title(lesson_md, "Renamed lesson")
    fronts = _count_calls(monkeypatch, "read_front_matter")
    library = load_library(big)
    assert [folder.name for (folder,) in fronts] == [changed.name]  # type: ignore[attr-defined]
    assert library.lessons[changed.name].title == "Renamed lesson"

    shutil.rmtree(changed)
    assert changed.name not in load_library(big).lessons


def test_a_corrupt_index_is_rebuilt(big: Path) -> None:
    first = load_library(big)
    index = index_path(big)
    index.write_bytes(index.read_bytes()[:1000])  # cut off mid-way
    assert load_library(big).lessons == first.lessons
    json.loads(index.read_text())  # written whole again
    index.write_text(json.dumps({"format": 1, "folders": "not a mapping"}))
    assert load_library(big).lessons == first.lessons


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_a_broken_lesson_among_many_names_its_file_and_line(
    big: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = sorted(big.iterdir())
    front = folders[100] / "lesson.md"
    front.write_text(front.read_text().replace("minutes: ", "minutes: many", 1))
    quiz = folders[200] / "quiz.yaml"
    quiz.write_text(quiz.read_text().replace("answer: ", "answer: z", 1))

    library = load_library(big)
    [error] = library.errors
    assert str(error).startswith(f"{front}:{_line_of(front, 'minutes: many')}: minutes:")
    assert len(library.lessons) == COUNT - 1
    with pytest.raises(ContentFileError) as raised:  # a broken quiz shows when the lesson opens
        library.get(folders[200].name)
    assert f"{quiz}:{_line_of(quiz, 'answer: z')}: questions.0.answer:" in str(raised.value)

    assert cli.run(["validate", str(big)]) == 1
    err = capsys.readouterr().err
    assert f"{front}:{_line_of(front, 'minutes: many')}: minutes:" in err
    assert f"{quiz}:{_line_of(quiz, 'answer: z')}: questions.0.answer:" in err


def test_the_shipped_lessons_validate(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["validate"]) == 0
    assert "4 lessons in" in capsys.readouterr().out


async def test_library_tab_searches_groups_and_opens(generated: Path, home: Path) -> None:
    library = load_library(generated)
    store = Store()
    wanted = next(e for e in library.lessons.values() if e.title.endswith("(part 124)"))
    store.touch_lesson(wanted.id)
    store.mark_read(wanted.id, [0, 1], of=4)
    app = QuantTutorApp(library, store, tutor=UnloadedTutor(library))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("r")
        view = app.screen.query_one(LibraryView)
        listing = view.query_one("#library-list")
        headers = [str(o.prompt) for o in listing.options if o.disabled]  # type: ignore[attr-defined]
        assert headers[0].startswith("Related to this lesson")
        assert headers[1].startswith(min(TRACKS, key=str.casefold))  # then the tracks, alphabetically
        assert listing.options[-1].id == "show-more"  # type: ignore[attr-defined]

        await pilot.press(*"part 124 ")  # the 124th generated lesson's title, then more words
        await pilot.press(*wanted.track.split()[0].lower())
        await pilot.pause()
        rows = [o for o in listing.options if not o.disabled]  # type: ignore[attr-defined]
        assert [o.id for o in rows] == [wanted.id]
        assert "read 50%" in str(rows[0].prompt)
        await pilot.press("enter")
        await pilot.pause()
        assert app.study is not None and app.study.lesson.id == wanted.id
    store.close()


async def test_library_search_shows_content_text_literally(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "content"
    generate_library(root, 3)
    lesson_md = next(root.iterdir()) / "lesson.md"
    _set_title(lesson_md, "[bold]x[/bold] literal")
    library = load_library(root)
    store = Store()
    app = QuantTutorApp(library, store, tutor=UnloadedTutor(library))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("r", *"[bold]")
        await pilot.pause()
        listing = app.screen.query_one("#library-list")
        [row] = [o for o in listing.options if not o.disabled]  # type: ignore[attr-defined]
        assert "[bold]x[/bold]" in str(row.prompt)
    store.close()


async def test_palette_opens_a_lesson_among_hundreds(generated: Path, home: Path) -> None:
    library = load_library(generated)
    store = Store()
    wanted = next(e for e in library.lessons.values() if e.title.endswith("(part 211)"))
    app = QuantTutorApp(library, store, tutor=UnloadedTutor(library))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+p", *"211")  # only "(part 211)" has it
        for _ in range(100):  # the palette searches in a worker
            await pilot.pause(0.05)
            if app.screen.query("CommandList") and app.screen.query_one("CommandList").option_count:
                break
        await pilot.press("enter")
        for _ in range(40):
            await pilot.pause(0.05)
            if app.study is not None and app.study.lesson.id == wanted.id:
                break
        assert app.study is not None and app.study.lesson.id == wanted.id
    store.close()


# --- the tutor's index: lazy, per lesson -----------------------------------------------------


@pytest.fixture(scope="module")
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the tests below: lessons one test embedded, the next reads."""
    return tmp_path_factory.mktemp("index-cache")


def _nth(library: Library, number: int) -> str:
    """The id of the generated lesson written number-th (the catalogue orders by minutes)."""
    return next(i for i in library.lessons if i.endswith(f"-{number:04d}"))


def test_a_question_embeds_its_lesson_and_related_ones_not_the_library(
    generated: Path, index_cache: Path
) -> None:
    library = load_library(generated)
    lesson = _nth(library, 1)
    first = lesson_and_related(library, lesson)
    assert first == [lesson, _nth(library, 2), _nth(library, 3)]

    retriever = Retriever.load(library, cache_dir=index_cache, lessons=first)
    assert sorted(retriever.embedded_lessons) == sorted(first) == sorted(retriever.searched)
    assert sorted(p.name.split(".")[0] for p in (index_cache / "index").iterdir()) == sorted(first)
    assert retriever.coverage() == {"lessons": 3, "total": COUNT, "done": False}

    result = retriever.search("Is 4-bit good enough for a chatbot?", lesson_id=lesson)
    assert result.covered and {h.lesson_id for h in result.hits} <= set(first)
    assert not retriever.search("What's a good recipe for banana bread?", lesson_id=lesson).covered

    # A question from lesson 0 embeds lesson 0 alone: its related ones (1 and 2) are searched already.
    zero = _nth(library, 0)
    assert retriever.search("How much memory does 4-bit save?", lesson_id=zero).covered
    assert retriever.embedded_lessons[3:] == [zero] and zero in retriever.searched
    assert len(retriever.searched) == 4


def test_the_background_pass_indexes_every_other_lesson(
    generated: Path, index_cache: Path, tmp_path: Path
) -> None:
    library = load_library(generated)
    ids = [_nth(library, n) for n in range(6)]
    root = tmp_path / "content"
    for lesson_id in ids:
        shutil.copytree(generated / lesson_id, root / lesson_id)
    broken = root / ids[5] / "lesson.md"  # no sections: it can't be opened, nor searched
    broken.write_text(broken.read_text().replace("\n## ", "\n#### "))
    small = load_library(root)

    retriever = Retriever.load(small, cache_dir=index_cache, lessons=lesson_and_related(small, ids[0]))
    assert retriever.searched == set(ids[:3])
    pauses: list[bool] = []
    steps: list[bool] = []

    def run(step: Callable[[], None]) -> None:
        steps.append(True)
        step()

    background = threading.Thread(
        target=retriever.index_rest, kwargs={"pause": lambda: pauses.append(True), "run": run}
    )
    background.start()
    background.join(timeout=300)
    assert not background.is_alive()
    assert len(steps) == len(pauses) == 3, "each other lesson a step of its own, a question first"
    assert retriever.searched == set(ids[:5])
    assert retriever.coverage() == {"lessons": 5, "total": 5, "done": True}
    assert {c.lesson_id for c in retriever.chunks} == set(ids[:5])
    assert len(retriever.vectors) == len(retriever.chunks)
    assert retriever.search("Is 4-bit good enough for a chatbot?").covered
    assert not retriever.search("What's a good recipe for banana bread?").covered
