"""The related tab: the lessons this one points to, to move between them."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tui.messages import OpenLesson
from tui.widgets.plain import Plain, literal
from tutor.content import Lesson, Library
from tutor.store import Store


class RelatedView(Vertical):
    def __init__(self, lesson: Lesson, library: Library, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.library = library
        self.store = store

    def compose(self) -> ComposeResult:
        yield Plain("Keep going: press Enter on a lesson to open it.", classes="hint")
        options = []
        for lesson_id in self.lesson.meta.related:
            other = self.library.lessons.get(lesson_id)
            if other is None:
                continue
            best = self.store.lesson(lesson_id).best_score
            score = "not taken" if best is None else f"best {best}/{len(other.questions)}"
            options.append(
                Option(
                    literal(
                        (other.title, "bold"),
                        f"\n{other.meta.track} · {other.meta.minutes} min · quiz {score}\n",
                        other.meta.summary,
                    ),
                    id=lesson_id,
                )
            )
        if not options:
            yield Plain("This lesson lists no related lessons that are installed.")
        yield OptionList(*options, id="related-list")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.post_message(OpenLesson(event.option.id))
