"""The precision lab: the quality cliff measured on the learner's own model and machine.

``run_cliff`` gathers three measurements: quality of every precision against bf16 on the
lesson text (:mod:`tutor.measure`), QA agreement and groundedness on the tutor's evaluation
questions, and the weight lab (:mod:`tutor.weight_lab`) on one real layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tutor.content import Library, default_content_dir
from tutor.machine import describe
from tutor.measure import (
    REFERENCE,
    WINDOW,
    Progress,
    QAResult,
    QualityRow,
    lesson_windows,
    method_text,
    quality_rows,
)
from tutor.weight_lab import LabRow, run_lab

if TYPE_CHECKING:
    from tutor.engine import Engine
    from tutor.retrieval import Retriever

QA_SET = default_content_dir().parent / "tests" / "eval_questions.yaml"


@dataclass
class CliffResult:
    rows: list[QualityRow]
    weight_lab: list[LabRow]
    layer: str
    method: str
    machine: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "weight_lab": [{"layer": self.layer, **r.as_dict()} for r in self.weight_lab],
            "method": self.method,
            "machine": self.machine,
            "notes": self.notes,
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
        return [quality, lab]


def load_qa_questions(limit: int, path: Path = QA_SET) -> list[tuple[str, str]]:
    """(question, lesson id) pairs spread evenly over the tutor's on-lesson evaluation set."""
    if limit <= 0 or not path.exists():
        return []
    items = yaml.safe_load(path.read_text(encoding="utf-8"))["on_lesson"]
    step = max(1, len(items) // limit)
    return [(item["question"], item["lesson"]) for item in items[::step][:limit]]


def qa_answers(
    engine: Engine, retriever: Retriever, questions: Sequence[tuple[str, str]], precision: str
) -> list[QAResult]:
    from tutor.tutor_chat import ask

    engine.switch(precision, wait=True)
    results = []
    for question, lesson_id in questions:
        answer = ask(question, retriever, engine, lesson_id)
        results.append(
            QAResult(answer.generated, sum(s.supported for s in answer.sentences), len(answer.sentences))
        )
    return results


def lab_layer(engine: Engine) -> tuple[str, Any]:
    """The layer the weight lab uses: the MLP down-projection of the middle decoder layer."""
    layers = engine.model.model.layers
    index = len(layers) // 2
    return f"model.layers.{index}.mlp.down_proj", layers[index].mlp.down_proj


def weight_lab(engine: Engine, library: Library, window: int = WINDOW) -> tuple[str, list[LabRow]]:
    """Quantize one real weight matrix every way; its inputs come from the model reading a lesson."""
    import torch

    engine.switch(REFERENCE, wait=True)
    name, layer = lab_layer(engine)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach()))
    try:
        ids = torch.tensor([lesson_windows(engine.tokenizer, library, window)[0]])
        with torch.inference_mode():
            engine.model(input_ids=ids.to(engine.torch_device), use_cache=False)
    finally:
        hook.remove()
    weight = layer.weight.detach().cpu()
    return name, run_lab(weight, captured[0].reshape(-1, weight.shape[1]).cpu())


def run_cliff(
    engine: Engine,
    library: Library,
    precisions: Sequence[str],
    *,
    retriever: Retriever | None = None,
    qa_questions: int = 0,
    max_windows: int | None = None,
    window: int = WINDOW,
    folder: Path | None = None,
    progress: Progress | None = None,
) -> CliffResult:
    questions = load_qa_questions(qa_questions) if retriever is not None else []
    qa = None
    if retriever is not None and questions:

        def qa(precision: str) -> list[QAResult]:
            return qa_answers(engine, retriever, questions, precision)

    rows = quality_rows(
        engine,
        library,
        list(dict.fromkeys([REFERENCE, *precisions])),
        window=window,
        max_windows=max_windows,
        qa=qa,
        qa_label=f"{QA_SET.name}:{len(questions)}",
        folder=folder,
        progress=progress,
    )
    layer, lab = weight_lab(engine, library, window)
    notes = [
        "The embedded SmolLM2-135M-Instruct was distributed as a Q4_1 GGUF; its bf16 reconstruction is the "
        "reference, so every figure measures loss relative to that already-4-bit-sourced model.",
        "The tied 49152×576 embedding / lm_head stays in 16-bit at every precision (as transformers does).",
    ]
    return CliffResult(rows, lab, layer, method_text(window), describe(engine.device), notes)
