"""The precision lab: the quality cliff measured on the learner's own model and machine.

``run_cliff`` gathers three measurements: quality of every precision against bf16 on the
lesson text (:mod:`tutor.lab.measure`), QA agreement and groundedness on the tutor's evaluation
questions (:mod:`tutor.lab.qa`), and the weight lab (:mod:`tutor.lab.weight_lab`) on one real
layer; then the sections that test one lesson claim each (:mod:`tutor.lab.sections`).

Three plans, shared by ``quant-tutor cliff --plan`` and the Lab tab (``m``: QUICK, ``e``:
CLAIMS, ``M``: FULL), so each plan's results are measured once and cached for both; QUICK and
CLAIMS read the same windows, so the claims reuse a quick table.
Rows arrive live (``on_row``), ``progress(phase, done, total)`` names the phase ("windows",
"qa <precision>", "weight lab", "easy vs hard", "memory", "mixed precision"), and ``cancel`` stops it between
batches and questions (``Cancelled``), caching only finished rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine.machine import describe
from tutor.engine.precisions import CALIBRATION, INT4, NO_WAY_BACK
from tutor.lab.cache import cache_file, cache_key, read_json, write_json
from tutor.lab.easy_hard import LONG, easy_hard_rows
from tutor.lab.footprint import CONTEXTS, footprint_rows
from tutor.lab.measure import (
    REFERENCE,
    Cancel,
    Cancelled,
    OnRow,
    Progress,
    QAResult,
    QualityRow,
    check_cancel,
    method_text,
    quality_rows,
)
from tutor.lab.mixed_precision import SCAN_WINDOW, mixed_precision
from tutor.lab.qa import QA_MAX_NEW_TOKENS, load_qa_questions, qa_answers, qa_label
from tutor.lab.sections import Section, calibrated, easy_hard, memory, mixed, no_way_back
from tutor.lab.weight_lab import LabRow, run_lab
from tutor.lab.windows import WINDOW, lesson_windows, pick_windows
from tutor.library.content import Library

if TYPE_CHECKING:
    from tutor.assistant.retrieval import Retriever
    from tutor.engine import Engine

__all__ = ["CLAIMS", "FULL", "PLANS", "QUICK", "Cancelled", "CliffResult", "Plan", "run_cliff"]

# 2: errors on held-out text, GPTQ calibrated on the windows before it; 3: the int4 kernel's grid
WEIGHT_LAB_VERSION = 3
CALIBRATION_WINDOWS = 8  # lesson windows whose inputs calibrate GPTQ in the weight lab


@dataclass(frozen=True)
class Plan:
    """How much of the measurement to make: which windows, how many QA questions."""

    name: str
    windows: int | None  # lesson windows scored, spread evenly over all lesson text; None: all
    qa_questions: int  # evaluation questions answered at every precision (with a retriever)
    window: int = WINDOW  # tokens per window
    max_new_tokens: int = QA_MAX_NEW_TOKENS  # cap on each QA answer, the same at every precision
    quiz_questions: int = 40  # easy vs hard: one-letter quiz answers (all the lessons' questions)
    continuations: int = 12  # easy vs hard: long greedy continuations of lesson text
    long_tokens: int = LONG  # easy vs hard: tokens per continuation
    contexts: tuple[int, ...] = CONTEXTS  # memory beyond weights: prompt lengths read
    mixed_windows: int = 6  # mixed precision: lesson windows of the scan and the variants (0: none)
    mixed_window: int = SCAN_WINDOW  # mixed precision: tokens per window
    claims: bool = True  # the lesson-claim sections after the table (no way back, easy vs hard, …)
    calibrate: bool = True  # calibration: measure int4 and gptq4 (GPTQ calibrates once per machine)


# QUICK: a first look: the table and the weight lab in well under a minute (a few windows spread
# over all lessons and no QA, because the answers are what is slow: bitsandbytes decodes int8 and
# 4-bit at 6-7 tok/s on a CPU without AVX-512; three answers per precision took this plan from
# 39 s to 171 s here). The claims take minutes more on such a CPU (easy vs hard 53 s, memory
# 44 s, mixed precision 36 s, GPTQ's first calibration 30 s), so they are a plan of their own.
# CLAIMS: the same table (from the cache after QUICK), then every claim on a few quiz questions,
# continuations and windows.
# FULL: the whole measurement (all lesson text, eight questions, the tutor's own cap, every quiz
# question, twelve continuations).
QUICK = Plan("quick", windows=6, qa_questions=0, claims=False)
CLAIMS = Plan("claims", windows=6, qa_questions=0, quiz_questions=8, continuations=4, mixed_windows=2)
FULL = Plan("full", windows=None, qa_questions=8)
PLANS = {plan.name: plan for plan in (QUICK, CLAIMS, FULL)}


@dataclass
class CliffResult:
    rows: list[QualityRow]
    weight_lab: list[LabRow]
    layer: str
    method: str
    machine: str
    notes: list[str] = field(default_factory=list)
    plan: str = FULL.name
    sections: list[Section] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "rows": [r.as_dict() for r in self.rows],
            "weight_lab": [{"layer": self.layer, **r.as_dict()} for r in self.weight_lab],
            "method": self.method,
            "machine": self.machine,
            "notes": self.notes,
            "sections": [s.key for s in self.sections],
            **{s.key: s.as_dict() for s in self.sections},
        }

    def tables(self) -> list[Any]:
        from rich.table import Table

        quality = Table(title=f"Quality against {REFERENCE} on the lesson text")
        for column in [
            "precision",
            "weights MiB",
            "PPL",
            "PPL ratio",
            "mean KL",
            "same top token",
            "QA token F1",
            "grounded",
        ]:
            quality.add_column(column, justify="left" if column == "precision" else "right")
        for r in self.rows:
            quality.add_row(*r.cells())
        lab = Table(title=f"Weight lab: {self.layer}")
        for column in ["scheme", "bits/weight", "weight error (rel. RMS)", "output error (rel. RMS)"]:
            lab.add_column(column, justify="left" if column == "scheme" else "right")
        for w in self.weight_lab:
            lab.add_row(
                w.scheme, f"{w.bits_per_weight:.2f}", f"{w.weight_rel_rms:.4f}", f"{w.output_rel_rms:.4f}"
            )
        return [quality, lab, *(s.table() for s in self.sections)]


def lab_layer(engine: Engine) -> tuple[str, Any]:
    """The layer the weight lab uses: the MLP down-projection of the middle decoder layer."""
    layers = engine.model.model.layers
    index = len(layers) // 2
    return f"model.layers.{index}.mlp.down_proj", layers[index].mlp.down_proj


class _Captured(Exception):
    """Raised by the weight lab's tap: the layer's input is in hand, the rest of the pass is not needed."""


def weight_lab(
    engine: Engine, library: Library, window: int = WINDOW, *, folder: Path | None = None
) -> tuple[str, list[LabRow]]:
    """Quantize one real weight matrix every way; its inputs come from the model reading a lesson.

    The model reads the first lesson windows at the reference precision, only up to that layer
    (``Engine.linear_inputs``: the layer's input is taken and the pass stops): the last one is the text
    every scheme's output error is measured on, the ones before calibrate GPTQ. Cached like the rows
    (under ``folder``, default the cache dir), per model, device, lesson text and window.
    """
    import torch

    engine.switch(REFERENCE, wait=True)
    name, layer = lab_layer(engine)
    key = cache_key(engine, library, window=window, layer=name, version=WEIGHT_LAB_VERSION)
    path = cache_file(key, folder, "weight-lab")
    with contextlib.suppress(TypeError, KeyError):  # absent, or another version's
        data = read_json(path)
        return data["layer"], [LabRow(**row) for row in data["rows"]]
    captured: list[torch.Tensor] = []

    def grab(names: tuple[str, ...], x: torch.Tensor) -> None:
        if name in names:
            captured.append(x.detach())
            raise _Captured

    ids = lesson_windows(engine.tokenizer, library, window)[: CALIBRATION_WINDOWS + 1]
    with contextlib.suppress(_Captured):
        engine.linear_inputs(ids, grab)
    weight = layer.weight.detach().cpu()
    inputs = captured[0].float().cpu().reshape(len(ids), -1, weight.shape[1])
    # The last window is the text every scheme is judged on; GPTQ calibrates on the ones before.
    held_out, calibration = inputs[-1], inputs[:-1].reshape(-1, weight.shape[1])
    rows = run_lab(weight, held_out, calibration)
    write_json(path, {"layer": name, "rows": [r.as_dict() for r in rows]})
    return name, rows


NOTES = [
    "The embedded SmolLM2-135M-Instruct was distributed as a Q4_1 GGUF; its bf16 reconstruction is the "
    "reference, so every figure measures loss relative to that already-4-bit-sourced model.",
    "The tied 49152×576 embedding / lm_head stays in 16-bit at every precision (as transformers does).",
]


def run_cliff(
    engine: Engine,
    library: Library,
    precisions: Sequence[str],
    *,
    plan: Plan = FULL,
    retriever: Retriever | None = None,
    qa_questions: int | None = None,
    max_windows: int | None = None,
    window: int | None = None,
    folder: Path | None = None,
    progress: Progress | None = None,
    on_row: OnRow | None = None,
    on_section: Callable[[Section], None] | None = None,
    cancel: Cancel = None,
) -> CliffResult:
    """Measure ``precisions`` (the reference always first) by ``plan``; cached rows are reused.

    ``qa_questions`` / ``window`` override the plan's; ``max_windows`` scores the first N windows
    instead of the plan's selection. QA runs only with a ``retriever``. ``on_row(row)`` gets each
    row as soon as it is final (cached ones at once, then bf16 first), ``on_section(section)``
    each lesson-claim section as soon as it is measured; ``progress(phase, done,
    total)`` reports "windows" (window passes), "qa <precision>" (questions), "weight lab",
    "calibrating gptq4" (its steps, once per machine),
    "easy vs hard", "memory" (precisions) and "mixed precision" (passes);
    ``cancel`` (a threading.Event or a callable) raises Cancelled between batches and questions.
    The engine is left at the precision it had.
    """
    window = plan.window if window is None else window
    count = plan.qa_questions if qa_questions is None else qa_questions
    questions = load_qa_questions(count) if retriever is not None else []
    qa = None
    calibrating_too = plan.claims and plan.calibrate and engine.device == "cpu"  # int4's kernel is CPU-only
    shown = list(dict.fromkeys([REFERENCE, *precisions]))
    asked = [*shown, *INT4] if calibrating_too else shown  # the precisions whose rows show QA
    if retriever is not None and questions:
        found, unanswered = retriever, set(asked)

        def qa(precision: str) -> list[QAResult]:
            answers = qa_answers(
                engine,
                found,
                questions,
                precision,
                max_new_tokens=plan.max_new_tokens,
                progress=progress,
                cancel=cancel,
            )
            unanswered.discard(precision)
            if not unanswered:  # what follows embeds nothing: its peaks need not hold the model
                found.embedder.release()
            return answers

    total = len(lesson_windows(engine.tokenizer, library, window))
    spread = None if max_windows is not None else plan.windows
    picked = pick_windows(total, first=max_windows, spread=spread)

    def shown_row(row: QualityRow) -> None:  # the sections' own rows arrive with the result
        if on_row is not None and row.precision in shown:
            on_row(row)

    sections: list[Section] = []

    def measured(names: Sequence[str], on_row: OnRow | None) -> list[QualityRow]:
        return quality_rows(
            engine,
            library,
            list(dict.fromkeys(names)),
            window=window,
            max_windows=max_windows,
            spread=spread,
            qa=qa,
            qa_precisions=asked,  # no-way-back's section compares windows only
            qa_label=qa_label(questions, plan.max_new_tokens),
            folder=folder,
            progress=progress,
            on_row=on_row,
            cancel=cancel,
        )

    def calibrating(done: int, total: int) -> None:
        check_cancel(cancel)
        if progress is not None:
            progress("calibrating gptq4", done, total)

    def publish(section: Section) -> None:
        sections.append(section)
        if on_section is not None:
            on_section(section)
        engine.release_prepared()  # each phase builds what it reads: the last one's need not stay

    # The engine goes back to the precision it had, whatever happens; inside, each phase visits
    # the precisions one by one, and only the one in use stays built.
    with engine.at(REFERENCE), engine.lean():
        if calibrating_too and engine.gptq.report() is None:  # once per machine, about half a minute
            calibrating(0, 1)  # its first step, the tapped pass, takes a while before it counts steps
            engine.gptq.calibrate(calibrating)
        # One table for every row the sections need too: the reference is read and its QA
        # answered once.
        rows = measured([*asked, *NO_WAY_BACK] if plan.claims else shown, shown_row)
        if retriever is not None:  # also when the QA rows came from the cache, and ``qa`` never ran
            retriever.embedder.release()
        engine.release_prepared()
        check_cancel(cancel)
        if progress is not None:
            progress("weight lab", 0, 1)
        layer, lab = weight_lab(engine, library, window, folder=folder)
        if progress is not None:
            progress("weight lab", 1, 1)
        if plan.claims:
            publish(no_way_back([r for r in rows if r.precision in NO_WAY_BACK]))
            if calibrating_too:
                publish(calibrated([r for r in rows if r.precision in CALIBRATION], engine.gptq.report()))
            each: dict[str, Any] = {
                "folder": folder,
                "progress": progress,
                "cancel": cancel,
            }  # every section's
            hard = easy_hard_rows(
                engine,
                library,
                shown,
                questions=plan.quiz_questions,
                continuations=plan.continuations,
                long=plan.long_tokens,
                **each,
            )
            publish(easy_hard(hard))
            publish(memory(footprint_rows(engine, library, shown, plan.contexts, **each)))
            if plan.mixed_windows:
                publish(
                    mixed(
                        mixed_precision(
                            engine, library, windows=plan.mixed_windows, window=plan.mixed_window, **each
                        )
                    )
                )
    method = method_text(
        window,
        windows=len(picked),
        of_windows=total,
        tokens=rows[0].tokens_scored if rows else None,
        qa_questions=len(questions),
        max_new_tokens=plan.max_new_tokens,
    )
    custom = max_windows is not None or window != plan.window or count != plan.qa_questions
    name = f"{plan.name} (custom)" if custom else plan.name
    return CliffResult(
        [r for r in rows if r.precision in shown],
        lab,
        layer,
        method,
        describe(engine.device),
        list(NOTES),
        name,
        sections,
    )
