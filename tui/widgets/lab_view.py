"""The precision lab tab: the quality cliff measured here, charted, and one question at every precision."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Input, ProgressBar
from textual_plotext import PlotextPlot

from tui.messages import TutorStatus
from tui.widgets.plain import Plain, literal
from tutor.content import Lesson
from tutor.diff import departures

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime
    from tutor.grounding import TutorAnswer
    from tutor.lab import CliffResult

LAB_PRECISIONS = ["bf16", "int8", "nf4", "fp4"]
LAB_QA_QUESTIONS = 8  # the same default as `quant-tutor cliff`, so both share the cache


class LabView(VerticalScroll, can_focus=True):
    BINDINGS = [
        Binding("m", "measure", "Measure"),
        Binding("c", "compare", "Compare a question"),
    ]

    def __init__(self, lesson: Lesson, runtime: TutorRuntime, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.runtime = runtime
        self.result: CliffResult | None = None
        self._measuring = False

    def compose(self) -> ComposeResult:
        yield Plain(
            "The quality cliff on the tutor's own model, measured on this machine: m measures "
            "(cached after the first run), c answers one question at every precision side by side.",
            id="lab-intro",
        )
        yield ProgressBar(id="lab-progress", show_eta=False)
        yield Plain(id="lab-status")
        table: DataTable[object] = DataTable(id="lab-table", cursor_type="row")
        yield table
        yield PlotextPlot(id="lab-chart")
        yield Plain(id="lab-weights")
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

    def _status(self) -> None:
        runtime = self.runtime
        if not runtime.ready:
            text = f"The lab needs the tutor's model: {runtime.badge()} {runtime.detail}".rstrip()
        elif self.result is None:
            text = (
                "Press m to measure perplexity, KL divergence and top-1 agreement for bf16, int8, nf4, fp4."
            )
        else:
            text = "Measured. c: compare answers across precisions."
        self.query_one("#lab-status", Plain).show(text)

    def on_tutor_status(self, _message: TutorStatus) -> None:
        self._status()

    # --- measuring -----------------------------------------------------------------

    def action_measure(self) -> None:
        if not self.runtime.ready:
            self.app.start_tutor()  # type: ignore[attr-defined]
            self.notify("Loading the tutor's model first; press m again when it is ready.")
            return
        if self._measuring:
            return
        self._measuring = True
        bar = self.query_one("#lab-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)
        self.query_one("#lab-status", Plain).show(
            "Measuring (the first run takes a few minutes; later runs are cached)…"
        )
        self._measure()

    @work(thread=True, exclusive=True, group="lab")
    def _measure(self) -> None:
        from tutor.lab import run_cliff

        engine, retriever = self.runtime.engine, self.runtime.retriever
        assert engine is not None

        def progress(what: str, done: int, total: int) -> None:
            self.app.call_from_thread(self._progress, what, done, total)

        try:
            result = run_cliff(
                engine,
                self.runtime.library,
                LAB_PRECISIONS,
                retriever=retriever,
                qa_questions=LAB_QA_QUESTIONS,
                progress=progress,
            )
        except Exception as exc:
            self.app.call_from_thread(self._failed, f"{type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self._show, result)

    def _progress(self, what: str, done: int, total: int) -> None:
        self.query_one("#lab-progress", ProgressBar).update(total=total, progress=done)
        self.query_one("#lab-status", Plain).show(f"Measuring: {what} {done}/{total}")

    def _failed(self, message: str) -> None:
        self._measuring = False
        self.query_one("#lab-progress").display = False
        self.query_one("#lab-status", Plain).show(f"Measuring failed: {message}")

    def _show(self, result: CliffResult) -> None:
        self._measuring = False
        self.result = result
        self.query_one("#lab-progress").display = False
        table = self.query_one("#lab-table", DataTable)
        table.clear()
        for r in result.rows:
            table.add_row(*r.cells())
        self._chart(result)
        lab = "  ".join(f"{w.scheme} {w.output_rel_rms:.3f}" for w in result.weight_lab)
        self.query_one("#lab-weights", Plain).show(
            literal((f"Weight lab · {result.layer} · output error (rel. RMS): ", "bold"), lab)
        )
        self.query_one("#lab-method", Plain).show(
            f"Method: {result.method}.\nMachine: {result.machine}.\n" + "\n".join(result.notes)
        )
        self._status()

    def _chart(self, result: CliffResult) -> None:
        chart = self.query_one("#lab-chart", PlotextPlot)
        chart.display = True
        plt = chart.plt
        plt.clear_data()
        plt.clear_figure()
        rows = result.rows
        xs = list(range(1, len(rows) + 1))
        reference = rows[0].weights_mib or 1.0
        # Distinct marker characters, so the series differ without colour.
        plt.scatter(xs, [r.kl_mean for r in rows], label="mean KL (●)", marker="●")
        plt.scatter(xs, [r.ppl_ratio - 1 for r in rows], label="PPL ratio − 1 (▲)", marker="▲")
        plt.scatter(xs, [r.weights_mib / reference for r in rows], label="weights ÷ bf16 (■)", marker="■")
        plt.xlim(0.5, len(rows) + 0.5)
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
        self._compare(question)

    @work(thread=True, exclusive=True, group="lab")
    def _compare(self, question: str) -> None:
        from tutor.engine import EngineError
        from tutor.tutor_chat import ask

        engine, retriever = self.runtime.engine, self.runtime.retriever
        assert engine is not None and retriever is not None
        start = engine.precision
        answers: dict[str, TutorAnswer] = {}
        try:
            for precision in LAB_PRECISIONS:
                engine.switch(precision, wait=True)
                answers[precision] = ask(question, retriever, engine, self.lesson.id)
                self.app.call_from_thread(self._column, precision, answers)
        except EngineError as exc:
            self.app.call_from_thread(self.notify, f"Compare stopped: {exc}", severity="error")
        finally:
            engine.switch(start, wait=True)
            self.app.call_from_thread(self.app.post_message, TutorStatus())

    def _column(self, precision: str, answers: dict[str, TutorAnswer]) -> None:
        answer = answers[precision]
        reference = answers[LAB_PRECISIONS[0]].generated
        stats = answer.stats
        head = f"{precision}{' (reference)' if precision == LAB_PRECISIONS[0] else ''}\n"
        info = (
            f"TTFT {stats.get('ttft_s')} s · {stats.get('tokens_per_s')} tok/s · "
            f"{stats.get('weights_mib')} MiB\n"
        )
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
