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
