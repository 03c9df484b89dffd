"""The lesson tab: rendered Markdown beside a key-terms panel; remembers where you were."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.timer import Timer
from textual.widgets import Markdown

from tui.messages import ProgressChanged, ShowTab
from tui.widgets.plain import Plain, literal
from tutor.library.models import Lesson
from tutor.progress.store import Store
from tutor.text import clean

APP_LINK = "quant-tutor:"
SAVE_DELAY_S = 0.4  # scrolling fires many events; write the position once it settles
READ_DWELL_S = 1.5  # a part counts as read once it has been on screen this long (End is not reading)
READ_PARTS = 40  # the lesson is counted in this many equal slices of its height
KEY_TERMS_SETTING = "key_terms_shown"


class LessonScroll(VerticalScroll, can_focus=True):
    """The lesson's scroll. Textual restyles every descendant of a widget whose focus changes:
    for a lesson's Markdown that took 90 ms a key press (200 ms while a reply streamed). No rule
    styles anything inside by this widget's focus, so only the widget is restyled."""

    def watch_has_focus(self, _has_focus: bool) -> None:
        self.app.stylesheet.update_nodes([self], animate=True)


class LessonView(Horizontal):
    def __init__(self, lesson: Lesson, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.store = store
        self._save_timer: Timer | None = None
        self._read_timer: Timer | None = None
        self._restored = False

    def compose(self) -> ComposeResult:
        meta = self.lesson.meta
        with LessonScroll(id="lesson-scroll"):
            yield Plain(literal((meta.title, "bold")), classes="lesson-title")
            yield Plain(f"{meta.track} · about {meta.minutes} min read", classes="lesson-meta")
            yield Plain(literal(("The premise  ", "bold"), meta.premise), classes="premise")
            yield Markdown(id="lesson-md", open_links=False)
        with VerticalScroll(id="key-terms") as terms:
            terms.display = bool(self.store.setting(KEY_TERMS_SETTING, True))
            yield Plain(literal(("Key terms", "bold")), classes="panel-title")
            for term in meta.key_terms:
                yield Plain(literal((term.term, "bold"), "\n", term.definition), classes="key-term")

    async def on_mount(self) -> None:
        await self.query_one(Markdown).update(clean(self.lesson.body))
        scroll = self.query_one("#lesson-scroll", VerticalScroll)
        self.watch(scroll, "scroll_y", self._scrolled, init=False)
        saved = self.store.lesson(self.lesson.id).scroll_y
        self.call_after_refresh(self._restore, saved)

    def _restore(self, y: float) -> None:
        scroll = self.query_one("#lesson-scroll", VerticalScroll)
        scroll.scroll_to(y=y, animate=False, immediate=True)
        self._restored = True
        self._start_reading_clock()

    def visible_parts(self) -> range:
        """The slices of the lesson whose middle is on screen now."""
        scroll = self.query_one("#lesson-scroll", VerticalScroll)
        total = scroll.virtual_size.height
        if total <= 0 or scroll.size.height <= 0:
            return range(0)
        part = total / READ_PARTS
        top, bottom = scroll.scroll_y, scroll.scroll_y + scroll.size.height
        first = max(0, math.ceil(top / part - 0.5))
        last = min(READ_PARTS, math.ceil(bottom / part - 0.5))
        return range(first, last)

    def _start_reading_clock(self) -> None:
        """Count what is on screen once it has stayed there READ_DWELL_S (restarted by every move)."""
        if self._read_timer is not None:
            self._read_timer.stop()
        if self.display and self.is_on_screen:
            self._read_timer = self.set_timer(READ_DWELL_S, self._count_read)

    def _count_read(self) -> None:
        if not self.is_on_screen:  # another tab took over while the clock ran
            return
        before = self.store.lesson(self.lesson.id).read_fraction
        if self.store.mark_read(self.lesson.id, self.visible_parts(), READ_PARTS) != before:
            self.post_message(ProgressChanged())

    def on_show(self) -> None:
        if self._restored:
            self._start_reading_clock()

    def _scrolled(self, _y: float) -> None:
        if not self._restored:
            return
        if self._save_timer is not None:
            self._save_timer.stop()
        self._save_timer = self.set_timer(SAVE_DELAY_S, self.save_position)
        self._start_reading_clock()

    def save_position(self) -> None:
        scroll = self.query_one("#lesson-scroll", VerticalScroll)
        self.store.save_reading(self.lesson.id, scroll.scroll_y)

    def jump_to(self, heading: str) -> bool:
        """Scroll the section with this heading to the top; False if there is none."""
        markdown = self.query_one(Markdown)
        wanted = heading.casefold()
        for _level, title, block_id in markdown.table_of_contents:
            if title.casefold() == wanted and block_id:
                scroll = self.query_one("#lesson-scroll", VerticalScroll)
                scroll.scroll_to_widget(markdown.query_one(f"#{block_id}"), top=True, animate=False)
                return True
        return False

    def on_markdown_link_clicked(self, event: Markdown.LinkClicked) -> None:
        """Links of the form quant-tutor:TAB open that tab; other links are only named, never opened."""
        event.stop()
        if event.href.startswith(APP_LINK):
            self.post_message(ShowTab(event.href.removeprefix(APP_LINK)))
        else:
            self.notify(f"Link: {event.href}", title="Not opened from the terminal app")

    def toggle_terms(self) -> None:
        """Show or hide the key terms, remembered across restarts."""
        panel = self.query_one("#key-terms")
        panel.display = not panel.display
        self.store.save_setting(KEY_TERMS_SETTING, panel.display)
