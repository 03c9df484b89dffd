"""Each screen at 80×24, compared with accepted SVG snapshots (pytest-textual-snapshot).

Update after an intended change with: .venv/bin/pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from tests.conftest import SEED, UnloadedTutor
from tui.app import QuantTutorApp
from tui.widgets import lesson_view
from tutor.library.content import Library
from tutor.progress.store import Store

Compare = Callable[..., bool]


@pytest.fixture
def app(library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> QuantTutorApp:
    # The progress tab shows where the store lives: use the platform default under a fixed-looking home.
    monkeypatch.delenv("QUANT_TUTOR_HOME")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # The header's "read N%" grows after 1.5 s on screen: on a busy machine a snapshot could catch it.
    monkeypatch.setattr(lesson_view, "READ_DWELL_S", 3600.0)
    return QuantTutorApp(library, Store(), lesson_id=SEED, tutor=UnloadedTutor(library))


async def _settle(pilot: Pilot[None], *keys: str) -> None:
    """Press ``keys``, then hold every text cursor still: a cursor caught mid-blink made the
    picture depend on the machine's speed (an input only exists once its tab is shown)."""
    await pilot.press(*keys)
    for field in pilot.app.screen.query("Input, TextArea"):
        field.cursor_blink = False  # type: ignore[attr-defined]
    await pilot.pause(0.3)


@pytest.mark.parametrize("tab", ["l", "p", "q", "r", "g", "t", "b"])
def test_each_tab(snap_compare: Compare, app: QuantTutorApp, tab: str) -> None:
    assert snap_compare(app, run_before=lambda pilot: _settle(pilot, tab))


def test_quiz_feedback(snap_compare: Compare, app: QuantTutorApp, library: Library) -> None:
    question = library.get(SEED).questions[0]
    wrong = "a" if question.answer != "a" else "b"
    assert snap_compare(app, press=["q", "enter", wrong], run_before=_settle)


def test_quiz_score(snap_compare: Compare, app: QuantTutorApp, library: Library) -> None:
    keys = ["q", "enter"]
    for number, question in enumerate(library.get(SEED).questions):
        keys += [question.answer if number % 3 else ("a" if question.answer != "a" else "b"), "enter"]
    assert snap_compare(app, press=keys, run_before=_settle)


def test_terminal_too_small(snap_compare: Compare, app: QuantTutorApp) -> None:
    assert snap_compare(app, terminal_size=(60, 18), run_before=_settle)
