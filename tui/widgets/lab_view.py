"""The precision lab tab: the quality cliff measured here, charted, and one question at every precision."""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, ProgressBar
from textual_plotext import PlotextPlot

from tui.messages import TutorStatus
from tui.widgets.plain import Plain, literal
from tutor.engine.client import EngineGone, EngineRefused
from tutor.engine.precisions import MEASURED
from tutor.lab.diff import departures
from tutor.lab.measure import QualityRow
from tutor.lab.sections import Section
from tutor.library.models import Lesson

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime
    from tutor.assistant.grounding import TutorAnswer

LAB_PRECISIONS = list(MEASURED)
# Compared answers stop after two sentences (the chat's stop after three): four columns side by
# side read as one comparison, and on a CPU without AVX-512 the three quantized answers take a
# third less waiting.
COMPARE_SENTENCES = 2
MARKERS = "●▲■◆✚"


# What the Lab's workers report, drawn by the Lab on the UI thread in the order it arrived.


class MeasureProgress(Message):
    def __init__(self, plan: str, data: dict[str, Any]) -> None:
        super().__init__()
        self.plan, self.data = plan, data


class MeasureRow(Message):
    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__()
        self.data = data


class MeasureSection(Message):
    def __init__(self, section: Section) -> None:
        super().__init__()
        self.section = section


class MeasureResult(Message):
    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__()
        self.data = data


class MeasureDone(Message):
    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome  # "" when the result came, else why it stopped


class CompareColumn(Message):
    def __init__(self, precision: str, answers: dict[str, TutorAnswer]) -> None:
        super().__init__()
        self.precision, self.answers = precision, answers


class CompareDone(Message):
    def __init__(self, unanswered: list[str]) -> None:
        super().__init__()
        self.unanswered = unanswered


def section_id(section: Section) -> str:
    return f"lab-{section.key.replace('_', '-')}"


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
        self._requests: dict[str, str] = {}  # "measure" / "compare": the request id in flight
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
            "with the tutor's answers (as `quant-tutor cliff`, many minutes). Esc stops; all are "
            "cached. c answers one question at every precision side by side (two sentences each).",
            id="lab-intro",
        )
        yield ProgressBar(id="lab-progress", show_eta=False)
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
        for label, width in [
            ("Precision", 9),
            ("MiB", 5),
            ("PPL", 7),
            ("PPL×", 6),
            ("KL", 7),
            ("Top-1", 6),
            ("QA F1", 5),
            ("Grnd", 5),
        ]:
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
        self._measure(plan, self._stop)

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
        for request_id in list(self._requests.values()):
            self.runtime.cancel(request_id, self.app.cancel_failed)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, group="lab")
    def _measure(self, plan: str, stop: threading.Event) -> None:
        client = self.runtime.client
        assert client is not None
        outcome = "Measuring stopped."
        try:
            request_id = self._requests["measure"] = uuid.uuid4().hex
            events = client.cliff(plan, LAB_PRECISIONS, request_id=request_id)
            try:
                for event in events:
                    if stop.is_set():
                        break  # closing the stream cancels the measurement in the engine
                    if event.name == "progress":
                        self.post_message(MeasureProgress(plan, event.data))
                    elif event.name == "row":
                        self.post_message(MeasureRow(event.data))
                    elif event.name == "section":
                        self.post_message(MeasureSection(Section.from_dict(event.data)))
                    elif event.name == "result":
                        self.post_message(MeasureResult(event.data))
                        outcome = ""
                    elif event.name == "error":
                        outcome = f"Measuring failed: {event.data['message']}"
            finally:
                events.close()  # type: ignore[attr-defined]
        except EngineGone as exc:
            self._engine_gone(str(exc))
            outcome = f"Measuring stopped: {self.runtime.error}. Press m again: the engine restarts."
        except EngineRefused as exc:
            outcome = f"Measuring failed: {exc}"
        self._requests.pop("measure", None)
        self.post_message(MeasureDone(outcome))

    def _engine_gone(self, why: str) -> None:
        """From a worker: the engine broke off; the header and Tutor tab say so too."""
        self.runtime.connection_lost(why)
        self.app.post_message(TutorStatus())

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
        self._chart(self.rows)

    def on_measure_section(self, message: MeasureSection) -> None:
        self._show_section(message.section)

    def on_measure_result(self, message: MeasureResult) -> None:
        self._show(message.data)

    def on_measure_done(self, message: MeasureDone) -> None:
        self._stop = None
        self.query_one("#lab-progress").display = False
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
        self._chart(rows)
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
            self.query_one("#lab-sections", Vertical).mount(self._section(section))

    def _section(self, section: Section) -> Vertical:
        """One lesson claim: its title, its table, its chart and the one-line reading."""
        table: DataTable[str] = DataTable(cursor_type="none", classes="lab-section-table")
        table.add_columns(*section.columns)
        table.add_rows(section.cells)
        chart = PlotextPlot(classes="lab-section-chart")
        plt = chart.plt
        spec = section.chart
        if spec.kind == "line":  # distinct markers, so the series differ without colour
            for (name, values), marker in zip(spec.series.items(), MARKERS, strict=False):
                plt.plot(list(range(1, len(values) + 1)), values, label=f"{name} ({marker})", marker=marker)
            longest = max((len(v) for v in spec.series.values()), default=1)
            plt.xticks([1, *range(longest // 4, longest + 1, max(1, longest // 4))])
            plt.ylim(0, 1.05)
            plt.xlabel(spec.x_label)
        else:
            if spec.kind == "stacked":  # the parts by colour; the table above has every figure
                plt.stacked_bar(spec.labels, list(spec.series.values()), labels=list(spec.series), width=0.4)
            else:
                for name, values in spec.series.items():
                    plt.bar(spec.labels, values, label=name, marker="█", width=0.3)
            plt.xlim(-0.5, len(spec.labels) + 0.5)  # room on the left for the legend, off the first bar
        plt.title(spec.title)
        return Vertical(
            Plain(literal((section.title, "bold")), classes="lab-section-title"),
            table,
            chart,
            Plain(section.reading, classes="lab-section-reading"),
            id=section_id(section),
            classes="lab-section",
        )

    def _chart(self, rows: list[QualityRow]) -> None:
        chart = self.query_one("#lab-chart", PlotextPlot)
        chart.display = True
        plt = chart.plt
        plt.clear_data()
        plt.clear_figure()
        xs = list(range(1, len(rows) + 1))
        reference = rows[0].weights_mib or 1.0
        # Distinct marker characters, so the series differ without colour.
        plt.scatter(xs, [r.kl_mean for r in rows], label="mean KL (●)", marker="●")
        plt.scatter(xs, [r.ppl_ratio - 1 for r in rows], label="PPL ratio − 1 (▲)", marker="▲")
        plt.scatter(xs, [r.weights_mib / reference for r in rows], label="weights ÷ bf16 (■)", marker="■")
        plt.xlim(-0.5, len(LAB_PRECISIONS) + 0.5)  # room on the left for the legend, off bf16's points
        plt.ylim(0, 1.2)
        plt.xticks(xs, [r.precision for r in rows])
        plt.title("Quality lost and memory kept, by precision")
        chart.refresh()

    # --- comparing -----------------------------------------------------------------

    def action_compare(self) -> None:
        box = self.query_one("#lab-question", Input)
        box.display = True
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
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
        columns.remove_children()
        for precision in LAB_PRECISIONS:
            columns.mount(
                Vertical(
                    Plain(f"{precision}: waiting…", classes="lab-answer"),
                    id=f"col-{precision}",
                    classes="lab-column",
                )
            )
        self._compare_stop = threading.Event()
        self._compare(question, self._compare_stop)

    @work(thread=True, exclusive=True, group="compare")
    def _compare(self, question: str, stop: threading.Event) -> None:
        from tutor.assistant.grounding import TutorAnswer

        client = self.runtime.client
        assert client is not None
        answers: dict[str, TutorAnswer] = {}
        try:
            for precision in LAB_PRECISIONS:  # each question names its precision: nothing to switch back
                if stop.is_set():
                    break
                request_id = self._requests["compare"] = uuid.uuid4().hex
                events = client.ask(
                    question,
                    lesson_id=self.lesson.id,
                    precision=precision,
                    request_id=request_id,
                    max_sentences=COMPARE_SENTENCES,
                )
                try:
                    for event in events:
                        if stop.is_set():
                            break  # closing the stream cancels the answer in the engine
                        if event.name == "answer":
                            answers[precision] = TutorAnswer.from_dict(event.data)
                        elif event.name == "error":
                            raise EngineRefused(event.data["message"])
                finally:
                    events.close()  # type: ignore[attr-defined]
                if stop.is_set():
                    break
                self.post_message(CompareColumn(precision, dict(answers)))
        except EngineGone as exc:
            self._engine_gone(str(exc))
            self.app.call_from_thread(self.notify, f"Compare stopped: {self.runtime.error}", severity="error")
        except EngineRefused as exc:
            self.app.call_from_thread(self.notify, f"Compare stopped: {exc}", severity="error")
        self._requests.pop("compare", None)
        self.post_message(CompareDone([p for p in LAB_PRECISIONS if p not in answers]))

    def on_compare_done(self, message: CompareDone) -> None:
        self._compare_stop = None
        for precision in message.unanswered:
            self.query_one(f"#col-{precision} Plain", Plain).show(f"{precision}: stopped")

    def on_compare_column(self, message: CompareColumn) -> None:
        precision, answers = message.precision, message.answers
        answer = answers[precision]
        reference = answers[LAB_PRECISIONS[0]].generated
        head = f"{precision}{' (reference)' if precision == LAB_PRECISIONS[0] else ''}\n"
        info = answer.stats.describe() + "\n"
        if not answer.grounded:
            body: list[str | tuple[str, str]] = [answer.answer]
        else:
            body = []
            for word, departed in departures(reference, answer.generated):
                # «…» marks a departure from the reference in words, not only by style.
                body += [(f"«{word}»", "underline") if departed else word, " "]
        share = answer.supported_share
        grounded = "" if share is None else f"\n{share:.0%} of sentences supported by the lesson"
        column = self.query_one(f"#col-{precision}", Vertical)
        column.query_one(Plain).show(literal((head, "bold"), (info, "dim"), *body, (grounded, "dim")))
