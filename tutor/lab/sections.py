"""The Lab's sections beyond the cliff table: one lesson claim each, measured on the tutor's model.

A section is plain data (figures, their table, a chart and a one-line reading), so the CLI
prints it, ``cliff --json`` carries it under its key and the Lab tab draws it, all the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tutor.engine.precisions import CALIBRATION, NO_WAY_BACK, PRECISIONS
from tutor.lab.easy_hard import PROMPT_TOKENS, TIE, EasyHardRow
from tutor.lab.footprint import FootprintRow
from tutor.lab.measure import REFERENCE, QualityRow
from tutor.lab.mixed_precision import HIGH, LOW, MixedResult
from tutor.text import plural

if TYPE_CHECKING:
    from tutor.engine.calibration import Calibration

# How close two KL figures must be to call them "the same loss" in a reading (relative).
SAME_KL = 0.05
# Every 4-bit format here: 4-bit codes and 32 bits of scale (and zero) per 64 weights.
BITS_PER_WEIGHT = 4.5


@dataclass(frozen=True)
class Chart:
    """Bars (one per label) for each named series, the series stacked (``kind="stacked"``), or
    lines (``kind="line"``: each series over x = 1, 2, …, named by ``x_label``)."""

    title: str
    labels: list[str]
    series: dict[str, list[float]]
    kind: str = "bar"
    x_label: str = ""


@dataclass(frozen=True)
class Section:
    key: str  # its key in ``cliff --json``
    title: str
    reading: str  # what the figures say, in one line
    method: str
    columns: list[str]
    cells: list[list[str]]  # the table as shown
    rows: list[dict[str, Any]]  # the figures, each with its precision (or variant) id
    chart: Chart
    extra: dict[str, Any] = field(default_factory=dict)  # figures that are not rows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Section:
        return cls(**{**data, "chart": Chart(**data["chart"])})

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=self.title, caption=self.reading)
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for cells in self.cells:
            table.add_row(*cells)
        return table


def label(precision: str) -> str:
    return PRECISIONS[precision].label if PRECISIONS[precision].restored_from else precision


def no_way_back(rows: Sequence[QualityRow]) -> Section:
    """bf16 from its masters, nf4, and nf4's weights widened back to bf16 storage."""
    by = {row.precision: row for row in rows}
    reference, four, restored = (by[p] for p in NO_WAY_BACK)
    same = abs(restored.kl_mean - four.kl_mean) <= SAME_KL * max(four.kl_mean, 1e-12)
    kept = "keeps nf4's loss" if same else "does not keep nf4's loss exactly"
    reading = (
        f"{label(restored.precision)} takes {restored.weights_mib:.0f} MiB like {REFERENCE} "
        f"({reference.weights_mib:.0f}) but {kept}: KL {restored.kl_mean:.4f} against nf4's "
        f"{four.kl_mean:.4f} and {reference.kl_mean:.4f} for {REFERENCE} from its masters. Wider "
        f"storage brings nothing back; only the bf16 masters do."
    )
    return Section(
        key="no_way_back",
        title="No way back: 4-bit weights stored in 16 bits again",
        reading=reading,
        method=(
            f"{label(restored.precision)}: {PRECISIONS[restored.precision].method}. The same windows "
            f"and measures as the cliff table."
        ),
        columns=["precision", "weights MiB", "PPL", "mean KL", "same top token"],
        cells=[
            [
                label(r.precision),
                f"{r.weights_mib:.0f}",
                f"{r.perplexity:.2f}",
                f"{r.kl_mean:.4f}",
                f"{r.top1_agreement:.1%}",
            ]
            for r in (reference, four, restored)
        ],
        rows=[r.as_dict() for r in (reference, four, restored)],
        chart=Chart(
            title="Mean KL against bf16 (bars) at the memory each holds",
            labels=[f"{label(r.precision)} {r.weights_mib:.0f} MiB" for r in (reference, four, restored)],
            series={"mean KL": [r.kl_mean for r in (reference, four, restored)]},
        ),
    )


def calibrated(rows: Sequence[QualityRow], report: Calibration | None) -> Section:
    """Three 4-bit formats at the same bits per weight: bitsandbytes' NF4 (data-free), int4
    rounded to nearest, and the same int4 grid rounded by GPTQ against calibration text."""
    by = {row.precision: row for row in rows}
    four, rtn, fitted = (by[p] for p in CALIBRATION)
    change = (fitted.kl_mean - rtn.kl_mean) / max(rtn.kl_mean, 1e-12)
    reading = (
        f"On the same int4 grid, GPTQ's rounding takes KL from {rtn.kl_mean:.4f} (round to nearest) to "
        f"{fitted.kl_mean:.4f} ({change:+.0%}, {plural(fitted.tokens_scored, 'scored token')}); NF4 at the "
        f"same {BITS_PER_WEIGHT} bits per weight: {four.kl_mean:.4f}. Data-free rounding minimises each "
        f"weight's error, calibration the layer's output on real text."
    )
    how = "not calibrated on this machine yet"
    if report is not None:
        took = f"{report.seconds:.0f} s" + (", once, cached since" if report.cached else "")
        how = f"calibrated on {plural(report.tokens, 'token')} of {report.source} in {took}"
    return Section(
        key="calibration",
        title="Calibration: three 4-bit formats at the same bits per weight",
        reading=reading,
        method=(
            f"Calibration: nf4: {PRECISIONS['nf4'].method}. int4: {PRECISIONS['int4'].method}. gptq4: "
            f"GPTQ (Frantar et al., 2022) on int4's grid, {how}; none of that text is among the "
            f"scored windows. The same windows and measures as the cliff table."
        ),
        columns=["precision", "bits/weight", "weights MiB", "PPL", "mean KL", "same top token", "QA F1"],
        cells=[
            [
                r.precision,
                str(BITS_PER_WEIGHT),
                f"{r.weights_mib:.0f}",
                f"{r.perplexity:.2f}",
                f"{r.kl_mean:.4f}",
                f"{r.top1_agreement:.1%}",
                "—" if r.qa_token_f1 is None else f"{r.qa_token_f1:.2f}",
            ]
            for r in (four, rtn, fitted)
        ],
        rows=[r.as_dict() for r in (four, rtn, fitted)],
        chart=Chart(
            title=f"Mean KL against {REFERENCE} at {BITS_PER_WEIGHT} bits per weight",
            labels=[r.precision for r in (four, rtn, fitted)],
            series={"mean KL": [r.kl_mean for r in (four, rtn, fitted)]},
        ),
        extra={"calibration": None if report is None else report.as_dict()},
    )


def easy_hard(rows: Sequence[EasyHardRow]) -> Section:
    """Quiz questions as a classification against long greedy continuations, per precision."""
    first = rows[0]
    short, long = first.checkpoints
    quantized = [r for r in rows if r.precision != REFERENCE]
    picks = ", ".join(f"{r.precision} {r.quiz_agreement:.0%}" for r in quantized)
    kept = ", ".join(f"{r.precision} {r.same_after(long):.0%}" for r in quantized)
    reading = (
        f"Same quiz pick as {REFERENCE}: {picks}; the same {long}-token continuation: {kept}. A short "
        f"answer has one chance to differ, a long one a chance at every token."
    )
    return Section(
        key="easy_hard",
        title="Easy vs hard: a short classification against a long continuation",
        reading=reading,
        method=(
            f"Easy vs hard: {plural(first.questions, 'quiz question')} as a classification (the choice whose "
            f"text is most likely after the question, by mean log-probability per token); "
            f"{plural(first.continuations, 'lesson-text prompt')} of {PROMPT_TOKENS} tokens that {REFERENCE} "
            f"continues greedily for {long} tokens, a continuation counted identical after k tokens "
            f"when the precision's top token is {REFERENCE}'s at each (or one {REFERENCE} ranks within "
            f"{TIE} logits of it, a near-tie another kernel may flip)."
        ),
        columns=[
            "precision",
            f"same pick as {REFERENCE}",
            "pick right",
            f"same {short} tokens",
            f"same {long} tokens",
        ],
        cells=[
            [
                r.precision,
                f"{r.quiz_agreement:.0%}",
                f"{r.quiz_accuracy:.0%}",
                f"{r.same_after(short):.0%}",
                f"{r.same_after(long):.0%}",
            ]
            for r in rows
        ],
        rows=[r.as_dict() for r in rows],
        chart=Chart(
            title=f"Continuations still identical to {REFERENCE}'s after k tokens",
            labels=[],
            series={r.precision: r.identical for r in rows},
            kind="line",
            x_label="k (tokens)",
        ),
    )


PARTS = {
    "weights": "weights_mib",
    "KV cache": "kv_cache_mib",
    "activations": "activations_mib",
    "runtime": "runtime_mib",
}


def memory(rows: Sequence[FootprintRow]) -> Section:
    """What a running model holds at each context length, per precision."""
    longest = max(r.context for r in rows)
    at = [r for r in rows if r.context == longest]
    kv = sorted({r.kv_cache_mib for r in at})
    same = f"{kv[0]:.1f} MiB at every precision" if len(kv) == 1 else f"{kv[0]:.1f}–{kv[-1]:.1f} MiB"
    weights = ", ".join(f"{r.precision} {r.weights_mib:.0f}" for r in at)
    active = [r.activations_mib for r in at]
    reading = (
        f"At {longest} tokens the KV cache holds {same} while the weights go {weights} MiB; reading "
        f"the prompt peaks at {min(active):.0f}–{max(active):.0f} MiB of activations, and the runtime "
        f"around the model is {at[0].runtime_mib:.0f} MiB: weight bits shrink only the weights."
    )
    return Section(
        key="memory",
        title="Memory beyond weights: the KV cache and activations do not shrink with weight bits",
        reading=reading,
        method=(
            "Memory: weights as in the table; KV cache, the keys and values buffer a reply of that "
            "many tokens fills; activations, the peak of torch's allocations while that many tokens "
            "of lesson text are read (the profiler's record of every allocation and free); runtime, "
            "the engine process's resident set before those reads less every weight tensor it holds."
        ),
        columns=[
            "precision",
            "tokens",
            "weights MiB",
            "KV cache MiB",
            "activations MiB",
            "runtime MiB",
            "total",
        ],
        cells=[
            [
                r.precision,
                str(r.context),
                f"{r.weights_mib:.0f}",
                f"{r.kv_cache_mib:.1f}",
                f"{r.activations_mib:.1f}",
                f"{r.runtime_mib:.0f}",
                f"{r.total_mib:.0f}",
            ]
            for r in rows
        ],
        rows=[r.as_dict() for r in rows],
        chart=Chart(
            title=f"MiB a reply of {longest} tokens holds beyond the runtime, by precision",
            labels=[r.precision for r in at],
            series={
                part: [getattr(r, field) for r in at] for part, field in PARTS.items() if part != "runtime"
            },
            kind="stacked",
        ),
    )


def mixed(result: MixedResult) -> Section:
    """nf4 with its most sensitive layers kept at int8, from none to all of them."""
    low, high = result.rows[0], result.rows[-1]
    ranked = sorted(range(len(result.sensitivity)), key=lambda i: -result.sensitivity[i])[:3]
    worst = ", ".join(f"{i} ({result.sensitivity[i]:.3f})" for i in ranked)
    halfway = (low.kl_mean + high.kl_mean) / 2
    knee = next((r for r in result.rows[1:] if r.kl_mean <= halfway), high)
    share = (low.kl_mean - knee.kl_mean) / max(low.kl_mean - high.kl_mean, 1e-12)
    reading = (
        f"Alone at {LOW}, layers {worst} cost the most KL. Keeping the {len(knee.int8_layers)} most "
        f"sensitive at {HIGH} ({knee.weights_mib:.0f} MiB, {knee.weights_mib - low.weights_mib:+.0f} over "
        f"{LOW}) takes KL from {low.kl_mean:.3f} to {knee.kl_mean:.3f}, {share:.0%} of the way to {HIGH}'s "
        f"{high.kl_mean:.3f} at {high.weights_mib:.0f} MiB."
    )
    return Section(
        key="mixed",
        title=f"Mixed precision: the most sensitive layers at {HIGH}, the rest at {LOW}",
        reading=reading,
        method=(
            f"Mixed precision: each decoder layer alone at {LOW} (the others {REFERENCE}), then the k "
            f"layers that cost most kept at {HIGH} and the rest at {LOW}; KL({REFERENCE} ‖ variant) over "
            f"{plural(low.tokens_scored, 'token')} of lesson text; weights MiB adds each layer's share of "
            f"its precision's measured bytes to what stays 16-bit."
        ),
        columns=["variant", f"layers at {HIGH}", "weights MiB", "mean KL", "same top token"],
        cells=[
            [
                r.variant,
                str(len(r.int8_layers)),
                f"{r.weights_mib:.0f}",
                f"{r.kl_mean:.4f}",
                f"{r.top1_agreement:.1%}",
            ]
            for r in result.rows
        ],
        rows=[r.as_dict() for r in result.rows],
        chart=Chart(
            title=f"Mean KL against {REFERENCE} by layers kept at {HIGH} (weights MiB in the labels)",
            labels=[f"{len(r.int8_layers)}: {r.weights_mib:.0f}" for r in result.rows],
            series={"mean KL": [r.kl_mean for r in result.rows]},
        ),
        extra={"sensitivity": result.sensitivity},
    )
