"""The progress tab: every lesson's reading, steps and quiz record, and where it is kept."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from tui.messages import OpenLesson
from tui.widgets.plain import Plain
from tutor.content import Library
from tutor.store import Store
from tutor.text import clean


def display_path(path: Path) -> str:
    """The path with the home folder shown as ~, as a learner would type it."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


class ProgressView(Vertical):
    def __init__(self, library: Library, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.library = library
        self.store = store

    def compose(self) -> ComposeResult:
        table: DataTable[object] = DataTable(id="progress-table", cursor_type="row")
        yield table
        yield Plain("Enter on a row opens that lesson.", classes="hint")
        yield Plain(f"Progress is saved as you go in {display_path(self.store.path)}", classes="hint")
        for error in self.library.errors:
            yield Plain(f"Could not load: {error}", classes="content-error")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for label, width in [("Lesson", 40), ("Read", 5), ("Steps", 5), ("Best", 5), ("Tries", 5)]:
            table.add_column(label, width=width)
        self.refresh_rows()

    def refresh_rows(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for lesson in self.library.ordered():
            p = self.store.lesson(lesson.id)
            best = "—" if p.best_score is None else f"{p.best_score}/{len(lesson.questions)}"
            steps = f"{len(p.steps_done)}/{len(lesson.meta.practice)}"
            table.add_row(
                Text(clean(lesson.title)),
                f"{round(p.read_fraction * 100)}%",
                steps,
                best,
                str(p.attempts),
                key=lesson.id,
            )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.post_message(OpenLesson(event.row_key.value))
