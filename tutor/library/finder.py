"""Finding a lesson in a big catalogue: word search over titles, tracks and summaries, by track.

Works on :class:`tutor.library.models.LessonEntry` rows only, so nothing here parses a lesson.
"""

from __future__ import annotations

from collections.abc import Iterable

from tutor.library.models import LessonEntry


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
