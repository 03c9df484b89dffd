"""The study screen's tabs: each one's id, title, key, view and what takes focus when it is shown.

Its own module so that the screen and its palette commands (tui/commands.py) read the same table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.content import Content
from textual.widget import Widget

from tui.widgets.chat_view import ChatView
from tui.widgets.lab_view import LabView
from tui.widgets.lesson_view import LessonView
from tui.widgets.library_view import LibraryView
from tui.widgets.practice_view import PracticeView
from tui.widgets.progress_view import ProgressView
from tui.widgets.quiz_view import QuizView

if TYPE_CHECKING:
    from tui.screens.study import StudyScreen


@dataclass(frozen=True)
class Tab:
    """One tab of the study screen: its id, title, key, what it shows and what takes focus."""

    id: str
    title: str
    key: str
    focus: str  # the selector focused when the tab is shown
    view: Callable[[StudyScreen], Widget]


TABS = (
    Tab("lesson", "Lesson", "l", "#lesson-scroll", lambda s: LessonView(s.lesson, s.store)),
    Tab("practice", "Practice", "p", "PracticeView", lambda s: PracticeView(s.lesson, s.store)),
    Tab("quiz", "Quiz", "q", "QuizView", lambda s: QuizView(s.lesson, s.store)),
    Tab("library", "Library", "r", "#library-search", lambda s: LibraryView(s.lesson, s.library, s.store)),
    Tab("progress", "Progress", "g", "#progress-table", lambda s: ProgressView(s.library, s.store)),
    Tab("tutor", "Tutor", "t", "#chat-input", lambda s: ChatView(s.lesson, s.store, s.runtime)),
    Tab("lab", "Lab", "b", "LabView", lambda s: LabView(s.lesson, s.runtime)),
)
TAB_BY_ID = {tab.id: tab for tab in TABS}


def tab_label(tab: Tab) -> Content:
    """'l Lesson': the key is in the tab itself, so the footer keeps room for the tab's own keys."""
    return Content.assemble((tab.key, "underline"), " ", tab.title)
