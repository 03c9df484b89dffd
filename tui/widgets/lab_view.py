"""The precision lab tab: the quality cliff measured here, charted, and one question at every precision.

The tab itself: its keys, its status line and progress bar, and where each result goes. The jobs
run on the engine in worker threads (lab_workers.py); the table, charts and compared columns are
drawn by lab_results.py.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Input, ProgressBar
from textual_plotext import PlotextPlot

from tui.widgets.lab_results import TABLE_COLUMNS, compare_column, draw_cliff, section_id, section_widget
from tui.widgets.lab_workers import (
    LAB_PRECISIONS,
    CompareColumn,
    CompareDone,
    MeasureDone,
    MeasureProgress,
    MeasureResult,
    MeasureRow,
    MeasureSection,
    compare,
    measure,
)
from tui.widgets.plain import Plain, literal
from tutor.lab.measure import QualityRow
from tutor.lab.sections import Section
from tutor.library.models import Lesson

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime


class LabView(VerticalScroll, can_focus=True):
    BINDINGS = [
        Binding("m", "measure('quick')", "Quick measure"),
        Binding("e", "measure('claims')", "Claims as experiments"),
        Binding("M", "measure('full')", "Full measure"),
        Binding("c", "compare", "Compare a question"),
        Binding("escape", "stop", "Stop", show=False),
    ]

    def __init__(self, lesson: Lesson, runtime: TutorRuntime, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.runtime = runtime
        self.rows: list[QualityRow] = []
        self.result: dict[str, Any] | None = None
        self._stop: threading.Event | None = None  # set: the measurement in flight should stop
        self._compare_stop: threading.Event | None = None  # set: the compare in flight should stop
        self.requests: dict[str, str] = {}  # "measure" / "compare": the request id in flight
        self._started = self._took = 0.0  # when the last measurement began (monotonic), how long it took

    @property
    def measuring(self) -> bool:
        return self._stop is not None

    def compose(self) -> ComposeResult:
        yield Plain(
            "The quality cliff on the tutor's own model, measured on this machine: m measures quickly "
            "(a few windows of lesson text, no QA, under a minute). e then tests the lesson's claims "
            "as experiments (no way back from 4 bits, calibration: GPTQ against rounding, easy vs "
            "hard tasks, memory beyond weights, mixed precision; minutes). M measures everything "
            "with the tutor's answers (as `quant-tutor cliff`; about three minutes on 2 cores). Esc "
            "stops; all are cached. c answers one question at every precision side by side (two "
            "sentences each).",
            id="lab-intro",
        )
        # A total while no measure runs: an indeterminate bar (total None) redraws itself 15 times
        # a second even while hidden, and each wake-up of this process can take a core from the
        # engine's decoding. Idle on the Tutor tab the app's process woke 42 times a second with
        # it, 27 without (threads' context switches over 10 s, 2-core AVX2 EPYC).
        yield ProgressBar(id="lab-progress", total=1, show_eta=False)
        yield Plain(id="lab-status")
        table: DataTable[object] = DataTable(id="lab-table", cursor_type="row")
        yield table
        yield PlotextPlot(id="lab-chart")
        yield Plain(id="lab-weights")
        yield Vertical(id="lab-sections")
        yield Plain(id="lab-method", classes="hint")
        yield Input(placeholder="Question to answer at every precision (Enter)", id="lab-question")
        yield Horizontal(id="lab-compare")

    def on_mount(self) -> None:
        table = self.query_one("#lab-table", DataTable)
        for label, width in TABLE_COLUMNS:
            table.add_column(label, width=width)
        self.query_one("#lab-progress").display = False
        self.query_one("#lab-chart").display = False
        self.query_one("#lab-question").display = False
        self._status()

    def _status(self, text: str | None = None) -> None:
        runtime = self.runtime
        if text is not None:
            pass
        elif self.measuring:
            return  # the progress handler owns the line while measuring
        elif not runtime.ready:
            text = f"The lab needs the tutor's model: {runtime.badge()} {runtime.detail}".rstrip()
        elif self.result is None:
            text = (
                "Press m for a quick measure of perplexity, KL divergence and top-1 agreement for "
                f"{', '.join(LAB_PRECISIONS)}, e for the lesson's claims as experiments, or M for "
                "everything with QA on the tutor's answers."
            )
        else:
            text = (
                f"Measured ({self.result['plan']}) in {self._took:.0f} s. e: the lesson's claims as "
                "experiments · M: the full measure · c: compare answers across precisions (all cached)."
            )
        self.query_one("#lab-status", Plain).show(text)

    def tutor_changed(self) -> None:
        self._status()

    # --- measuring -----------------------------------------------------------------

    def action_measure(self, plan: str) -> None:
        if not self.runtime.ready:
            self.app.start_tutor()  # type: ignore[attr-defined]
            self.notify("Loading the tutor's model first; press m again when it is ready.")
            return
        if self.measuring:
            self.notify("Already measuring; Esc stops it.")
            return
        self._stop = threading.Event()
        self._started = time.monotonic()
        self.rows, self.result = [], None
        self.query_one("#lab-table", DataTable).clear()
        self.query_one("#lab-sections", Vertical).remove_children()
        bar = self.query_one("#lab-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self._status(f"Measuring ({plan}): starting… (Esc stops)")
        measure(self, plan, self._stop)  # a worker: lab_workers.py

    def action_stop(self) -> None:
        if self.measuring or self._compare_stop is not None:
            self.stop_jobs()
        else:
            self.screen.focus_next()

    def stop_jobs(self) -> None:
        """Stop the measurement and the compare in flight (Esc, or the learner left the tab):
        the engine is free for the chat again within a token."""
        for flag in (self._stop, self._compare_stop):
            if flag is not None:
                flag.set()
        for request_id in list(self.requests.values()):
            self.runtime.cancel(request_id, self.app.cancel_failed)  # type: ignore[attr-defined]

    def on_measure_progress(self, message: MeasureProgress) -> None:
        data = message.data
        self.query_one("#lab-progress", ProgressBar).update(total=data["total"], progress=data["done"])
        self._status(
            f"Measuring ({message.plan}): {data['phase']} {data['done']}/{data['total']} (Esc stops)"
        )

    def on_measure_row(self, message: MeasureRow) -> None:
        row = QualityRow(**message.data)
        self.rows.append(row)
        self.query_one("#lab-table", DataTable).add_row(*row.cells())
        draw_cliff(self.query_one("#lab-chart", PlotextPlot), self.rows)

    def on_measure_section(self, message: MeasureSection) -> None:
        self._show_section(message.section)

    def on_measure_result(self, message: MeasureResult) -> None:
        self._show(message.data)

    def on_measure_done(self, message: MeasureDone) -> None:
        self._stop = None
        bar = self.query_one("#lab-progress", ProgressBar)
        bar.display = False
        bar.update(total=1, progress=0)  # not indeterminate: no redraws while hidden
        self._took = time.monotonic() - self._started
        self._status(message.outcome or None)

    def _show(self, result: dict[str, Any]) -> None:
        self.result = result
        rows = [QualityRow(**r) for r in result["rows"]]
        if [r.precision for r in rows] != [r.precision for r in self.rows]:
            table = self.query_one("#lab-table", DataTable)
            table.clear()
            for r in rows:
                table.add_row(*r.cells())
        self.rows = rows
        draw_cliff(self.query_one("#lab-chart", PlotextPlot), rows)
        lab = "  ".join(f"{w['scheme']} {w['output_rel_rms']:.3f}" for w in result["weight_lab"])
        layer = result["weight_lab"][0]["layer"] if result["weight_lab"] else ""
        self.query_one("#lab-weights", Plain).show(
            literal((f"Weight lab · {layer} · output error (rel. RMS): ", "bold"), lab)
        )
        sections = [Section.from_dict(result[key]) for key in result.get("sections", [])]
        for section in sections:
            self._show_section(section)
        machine = f"Machine: {result['machine']}."
        lines = [f"Method: {result['method']}.", *(s.method for s in sections), machine]
        self.query_one("#lab-method", Plain).show("\n".join([*lines, *result["notes"]]))

    def _show_section(self, section: Section) -> None:
        """Draw a section as it arrives (live, or with a cached result), once."""
        if not self.query(f"#{section_id(section)}"):
            self.query_one("#lab-sections", Vertical).mount(section_widget(section))

    # --- comparing -----------------------------------------------------------------

    def action_compare(self) -> None:
        box = self.query_one("#lab-question", Input)
        box.display = True
        box.focus()
        self._question_on_top()  # below a measured result it opens off screen

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            return
        if not self.runtime.ready:
            self.app.start_tutor()  # type: ignore[attr-defined]
            self.notify("The tutor's model is still loading; try again when it is ready.")
            return
        if self._compare_stop is not None:
            self.notify("Already comparing; Esc stops it.")
            return
        columns = self.query_one("#lab-compare", Horizontal)
        await columns.remove_children()
        await columns.mount_all(
            Vertical(
                Plain(f"{precision}: waiting…", classes="lab-answer"),
                id=f"col-{precision}",
                classes="lab-column",
            )
            for precision in LAB_PRECISIONS
        )
        self._question_on_top()
        self._compare_stop = threading.Event()
        compare(self, question, self._compare_stop)  # a worker: lab_workers.py

    def on_compare_done(self, message: CompareDone) -> None:
        self._compare_stop = None
        for precision in message.unanswered:
            self.query_one(f"#col-{precision} Plain", Plain).show(f"{precision}: stopped")

    def on_compare_column(self, message: CompareColumn) -> None:
        column = self.query_one(f"#col-{message.precision}", Vertical)
        column.query_one(Plain).show(compare_column(message.precision, message.answers))
        self._question_on_top()

    def _question_on_top(self) -> None:
        """The compared question at the top of the view, its columns under it as they fill in
        (scrolled once the layout has made room for them)."""
        self.call_after_refresh(self.query_one("#lab-question", Input).scroll_visible, top=True)
