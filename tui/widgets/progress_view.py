"""The progress tab: every lesson's reading, steps and quiz record, and where it is kept."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from tui.messages import OpenLesson
from tui.widgets.plain import Plain
from tutor.library.content import Library
from tutor.library.models import QUIZ_LENGTH
from tutor.progress.records import LessonSummary
from tutor.progress.store import Store
from tutor.text import clean


def display_path(path: Path) -> str:
    """The path with the home folder shown as ~, as a learner would type it."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


FIGURE_COLUMNS = ("Read", "Steps", "Best", "Tries")
FIGURE_WIDTH = 5
MIN_TITLE_WIDTH = 20


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
        yield Plain(classes="content-error")

    def on_mount(self) -> None:
        # Only the columns: the rows (one per lesson, thousands in a big library) are read when
        # the tab is shown, so start-up never waits for them.
        table = self.query_one(DataTable)
        table.add_column("Lesson", width=MIN_TITLE_WIDTH, key="lesson")
        for label in FIGURE_COLUMNS:
            table.add_column(label, width=FIGURE_WIDTH)

    def on_resize(self) -> None:
        """The lesson column takes the width the figures leave; a title cut there ends in …."""
        table = self.query_one(DataTable)
        figures = len(FIGURE_COLUMNS) * (FIGURE_WIDTH + 2 * table.cell_padding)
        spare = table.scrollable_content_region.width - figures - 2 * table.cell_padding
        table.columns["lesson"].width = max(MIN_TITLE_WIDTH, spare)  # type: ignore[index]
        table.refresh()

    def refresh_rows(self) -> None:
        """Every lesson's row from one grouped read of the store; the table draws only the rows
        on screen. Lessons found broken since start-up (on opening them) are listed below."""
        summaries = self.store.summaries()
        table = self.query_one(DataTable)
        table.clear()
        for entry in self.library.lessons.values():
            p = summaries.get(entry.id, LessonSummary())
            table.add_row(
                Text(clean(entry.title), no_wrap=True, overflow="ellipsis"),
                f"{round(p.read_fraction * 100)}%",
                f"{p.steps_done}/{entry.steps}",
                "—" if p.best_score is None else f"{p.best_score}/{QUIZ_LENGTH}",
                str(p.attempts),
                key=entry.id,
            )
        errors = "\n".join(f"Could not load: {error}" for error in self.library.errors)
        self.query_one(".content-error", Plain).show(errors)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.post_message(OpenLesson(event.row_key.value))
