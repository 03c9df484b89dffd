"""The command palette's "Open lesson": a provider that searches the library index.

A library can hold thousands of lessons; listing each as a system command made the palette
fuzzy-match and draw every one of them on each key press. This provider discovers only the
current lesson's related ones and answers a search with the first few matches.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tutor.library.models import LessonEntry

if TYPE_CHECKING:
    from tui.app import QuantTutorApp

MAX_HITS = 20
PREFIX = "Open lesson: "
_PREFIX_WORDS = {"open", "lesson", "lesson:"}  # the learner may type the command's own name first


class LessonCommands(Provider):
    @property
    def _app(self) -> QuantTutorApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        study = self._app.study
        lessons = self._app.library.lessons
        for lesson_id in study.lesson.meta.related if study is not None else ():
            if lesson_id in lessons:
                entry = lessons[lesson_id]
                yield DiscoveryHit(PREFIX + entry.title, self._opener(entry), help=entry.summary)

    async def search(self, query: str) -> Hits:
        words = query.split()
        while words and words[0].casefold() in _PREFIX_WORDS:
            words.pop(0)
        if not words:
            return
        matcher = self.matcher(" ".join(words))
        for rank, entry in enumerate(self._app.lesson_finder.find(" ".join(words))[:MAX_HITS]):
            name = PREFIX + entry.title
            # Every word matched somewhere (title, track or summary); the title's own fuzzy
            # score orders the hits, and the library's order breaks ties.
            score = max(matcher.match(name), 0.5) - rank / 1000
            yield Hit(score, matcher.highlight(name), self._opener(entry), text=name, help=entry.summary)

    def _opener(self, entry: LessonEntry) -> partial[object]:
        return partial(self._app.open_lesson, entry.id)  # the palette awaits it once it has closed
