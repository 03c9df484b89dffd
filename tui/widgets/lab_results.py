"""What the Lab draws from its results: the cliff table's columns and chart, each lesson claim's
section (title, table, chart, reading), and a compared answer's column."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.containers import Vertical
from textual.content import Content
from textual.widgets import DataTable
from textual_plotext import PlotextPlot

from tui.widgets.lab_workers import LAB_PRECISIONS
from tui.widgets.plain import Plain, literal
from tutor.lab.diff import departures
from tutor.lab.measure import QualityRow
from tutor.lab.sections import Section

if TYPE_CHECKING:
    from tutor.assistant.grounding import TutorAnswer

# The cliff table's columns: label, width.
TABLE_COLUMNS = [
    ("Precision", 9),
    ("MiB", 5),
    ("PPL", 7),
    ("PPL×", 6),
    ("KL", 7),
    ("Top-1", 6),
    ("QA F1", 5),
    ("Grnd", 5),
]
MARKERS = "●▲■◆✚"


def section_id(section: Section) -> str:
    return f"lab-{section.key.replace('_', '-')}"


def section_widget(section: Section) -> Vertical:
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


def draw_cliff(chart: PlotextPlot, rows: list[QualityRow]) -> None:
    """The cliff chart: quality lost (KL, PPL ratio) and memory kept, one point per precision."""
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


def compare_column(precision: str, answers: dict[str, TutorAnswer]) -> Content:
    """A compared answer's column: its stats, its words (those that depart from the reference
    marked «…»), and how much of it the lesson supports."""
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
    return literal((head, "bold"), (info, "dim"), *body, (grounded, "dim"))
