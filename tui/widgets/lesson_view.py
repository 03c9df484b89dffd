"""The lesson tab: rendered Markdown beside a key-terms panel; remembers where you were."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Markdown

from tui.messages import ProgressChanged, ShowTab
from tui.widgets.plain import Plain, literal
from tutor.content import Lesson
from tutor.store import Store
from tutor.text import clean

APP_LINK = "quant-tutor:"
SAVE_DELAY_S = 0.4  # scrolling fires many events; write the position once it settles


class LessonView(Horizontal):
    def __init__(self, lesson: Lesson, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.store = store
        self._save_timer = None
        self._restored = False

    def compose(self) -> ComposeResult:
        meta = self.lesson.meta
        with VerticalScroll(id="lesson-scroll", can_focus=True):
            yield Plain(literal((meta.title, "bold")), classes="lesson-title")
            yield Plain(f"{meta.track} · about {meta.minutes} min read", classes="lesson-meta")
            yield Plain(literal(("The premise  ", "bold"), meta.premise), classes="premise")
            yield Markdown(id="lesson-md", open_links=False)
        with VerticalScroll(id="key-terms"):
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

    def read_fraction(self) -> float:
        scroll = self.query_one("#lesson-scroll", VerticalScroll)
        total = scroll.virtual_size.height
        if total <= 0:
            return 0.0
        return min(1.0, (scroll.scroll_y + scroll.size.height) / total)

    def _scrolled(self, _y: float) -> None:
        if not self._restored:
            return
        if self._save_timer is not None:
            self._save_timer.stop()
        self._save_timer = self.set_timer(SAVE_DELAY_S, self.save_position)

    def save_position(self) -> None:
        scroll = self.query_one("#lesson-scroll", VerticalScroll)
        self.store.save_reading(self.lesson.id, scroll.scroll_y, self.read_fraction())
        self.post_message(ProgressChanged())

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
        panel = self.query_one("#key-terms")
        panel.display = not panel.display
