"""Typed messages that tabs post to the study screen."""

from __future__ import annotations

from textual.message import Message


class ProgressChanged(Message):
    """Something the header and progress tab show was saved."""


class JumpToSection(Message):
    """Show the lesson tab scrolled to a section heading."""

    def __init__(self, heading: str) -> None:
        super().__init__()
        self.heading = heading


class OpenLesson(Message):
    """Switch the study screen to another lesson."""

    def __init__(self, lesson_id: str) -> None:
        super().__init__()
        self.lesson_id = lesson_id


class AskTutor(Message):
    """Open the tutor tab with a question prefilled (from a practice step or quiz review)."""

    def __init__(self, question: str, step: int | None = None) -> None:
        super().__init__()
        self.question = question
        self.step = step


class TutorStatus(Message):
    """The tutor's model or index changed state (loading progress, ready, failed, switched).

    Posted to the app, which tells the study screen. It must not bubble: a copy reaching the
    app from a widget would start the round again, forever.
    """

    bubble = False


class ShowTab(Message):
    """Switch the study screen to a tab (from a link in the lesson)."""

    def __init__(self, tab: str) -> None:
        super().__init__()
        self.tab = tab
