"""The library tab: this lesson's related ones, then every lesson by track, with a search.

Built for a catalogue of thousands: the list is filled when the tab is first shown, from the
library index only (no lesson is parsed), and shows a page of lessons at a time.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

from tui.messages import OpenLesson
from tui.widgets.plain import Plain, literal
from tutor.library.content import Library
from tutor.library.finder import by_track
from tutor.library.models import Lesson, LessonEntry
from tutor.progress.records import MARK_WIDTH, LessonSummary, progress_mark
from tutor.progress.store import Store
from tutor.text import plural

PAGE = 100  # lessons listed at a time; "show more" adds another page
MORE = "show-more"  # the option id of "show more"


class LibraryView(Vertical):
    BINDINGS = [
        Binding("down", "to_list", "To the list", show=False),
        Binding("escape", "to_list", "To the list", show=False),
        Binding("slash", "to_search", "Search", show=False),
    ]

    def __init__(self, lesson: Lesson, library: Library, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.library = library
        self.store = store
        self._summaries: dict[str, LessonSummary] = {}
        self._shown = PAGE

    def compose(self) -> ComposeResult:
        count = plural(len(self.library.lessons), "lesson")
        keys = "↓ list · / search · Enter opens"
        yield Plain(f"Search {count} by title, track or summary · {keys}", classes="hint")
        yield Input(placeholder="Search the library", id="library-search")
        yield OptionList(id="library-list")
        yield Plain(id="library-detail", classes="hint")

    def refresh_list(self) -> None:
        """Re-read the progress marks and redraw (the tab was shown)."""
        self._summaries = self.store.summaries()
        self._fill()

    @on(Input.Changed, "#library-search")
    def _search(self) -> None:
        self._shown = PAGE
        self._fill()

    def _fill(self, highlight_from: int = 0) -> None:
        """List the related lessons (when not searching), then the first ``_shown`` matches by
        track, then "show more"; highlight the first lesson at or after ``highlight_from``."""
        query = self.query_one("#library-search", Input).value
        found = self.app.lesson_finder.find(query)  # type: ignore[attr-defined]
        options: list[Option] = []
        if not query.strip():
            related = [self.library.lessons[i] for i in self.lesson.meta.related if i in self.library.lessons]
            options += self._group("Related to this lesson", related, len(related), prefix="related:")
        budget = self._shown
        for track, entries in by_track(found):
            if budget <= 0:
                break
            options += self._group(track, entries[:budget], len(entries))
            budget -= len(entries)
        if len(found) > self._shown:
            more = min(PAGE, len(found) - self._shown)
            options.append(Option(literal(f"Show {more} more (of {len(found)} found)…"), id=MORE))
        if not found:
            options.append(Option(literal("No lesson matches; try fewer or other words."), disabled=True))
        listing = self.query_one(OptionList)
        listing.set_options(options)
        enabled = (i for i, option in enumerate(options) if i >= highlight_from and not option.disabled)
        listing.highlighted = next(enabled, None)

    def _group(self, heading: str, entries: list[LessonEntry], total: int, prefix: str = "") -> list[Option]:
        """A track's header (with how many lessons it has in all) and its rows shown now."""
        if not entries:
            return []
        header = Option(literal((f"{heading} ({total})", "bold")), disabled=True)
        return [header, *(self._row(entry, prefix) for entry in entries)]

    def _row(self, entry: LessonEntry, prefix: str) -> Option:
        mark = progress_mark(self._summaries.get(entry.id)).ljust(MARK_WIDTH)
        current = "  (open now)" if entry.id == self.lesson.id else ""
        return Option(literal((f" {mark} ", "dim"), f"{entry.title}{current}"), id=prefix + entry.id)

    @on(OptionList.OptionHighlighted, "#library-list")
    def _describe(self, event: OptionList.OptionHighlighted) -> None:
        entry = self._entry(event.option.id)
        detail = self.query_one("#library-detail", Plain)
        if entry is None:
            detail.show("")
            return
        detail.show(literal(f"{entry.track} · {entry.minutes} min\n", entry.summary))

    def _entry(self, option_id: str | None) -> LessonEntry | None:
        lesson_id = (option_id or "").removeprefix("related:")
        return self.library.lessons.get(lesson_id)

    @on(OptionList.OptionSelected, "#library-list")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self._choose(event.option_index)

    @on(Input.Submitted, "#library-search")
    def _submitted(self) -> None:
        highlighted = self.query_one(OptionList).highlighted
        if highlighted is not None:
            self._choose(highlighted)

    def _choose(self, index: int) -> None:
        """Open the lesson at ``index``, or show the next page where "show more" is."""
        option = self.query_one(OptionList).get_option_at_index(index)
        if option.id == MORE:
            self._shown += PAGE
            self._fill(highlight_from=index)
            return
        entry = self._entry(option.id)
        if entry is not None:
            self.post_message(OpenLesson(entry.id))

    def action_to_list(self) -> None:
        self.query_one(OptionList).focus()

    def action_to_search(self) -> None:
        self.query_one(Input).focus()
