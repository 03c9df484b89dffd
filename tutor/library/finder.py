"""Finding a lesson in a big catalogue: word search over titles, tracks and summaries, by track.

Works on :class:`tutor.library.content.LessonEntry` rows only, so nothing here parses a lesson.
"""

from __future__ import annotations

from collections.abc import Iterable

from tutor.library.content import QUIZ_LENGTH, LessonEntry
from tutor.progress.records import LessonSummary


class LessonFinder:
    """Every word of the query must appear (case-insensitively) in the title, track or summary."""

    def __init__(self, entries: Iterable[LessonEntry]) -> None:
        self._rows = [(e, f"{e.title}\n{e.track}\n{e.summary}".casefold()) for e in entries]

    def find(self, query: str) -> list[LessonEntry]:
        """The matching entries in catalogue order (all of them for an empty query)."""
        words = query.casefold().split()
        return [entry for entry, text in self._rows if all(word in text for word in words)]


def by_track(entries: Iterable[LessonEntry]) -> list[tuple[str, list[LessonEntry]]]:
    """The entries grouped by track, tracks alphabetically, each keeping catalogue order."""
    groups: dict[str, list[LessonEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.track, []).append(entry)
    return sorted(groups.items(), key=lambda group: group[0].casefold())


MARK_WIDTH = len(f"quiz {QUIZ_LENGTH}/{QUIZ_LENGTH}")


def progress_mark(summary: LessonSummary | None) -> str:
    """A lesson's progress in a word or two (at most MARK_WIDTH characters), for lists: the best
    quiz score, else how much was read, else "new". Words, never only a colour."""
    if summary is not None and summary.best_score is not None:
        return f"quiz {summary.best_score}/{QUIZ_LENGTH}"
    if summary is not None and (summary.read_fraction > 0 or summary.steps_done):
        return f"read {round(summary.read_fraction * 100)}%"
    return "new"
