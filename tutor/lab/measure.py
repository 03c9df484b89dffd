"""Quality against the reference precision, measured on the lessons' own text.

Method (after llama.cpp's ``perplexity --kl-divergence``): the plain text of every shipped
lesson is tokenized and cut into fixed windows; each window is read from scratch at every
precision and only its second half is scored, so every scored token has at least half a
window of context. Per precision: perplexity (exp of the mean negative log-likelihood),
its ratio to the reference's, the mean KL divergence KL(reference ‖ precision) of the
next-token distributions, and the share of positions where both pick the same top token.
Windows are identical for every precision. Results are cached per (model, precision,
content, windows, QA set, method).

How the work is ordered (``quality_rows``): windows are read in batches, one forward pass
per batch and precision (one per window for int8, whose outlier columns depend on the
batch). The reference reads every window first and its distributions go to a temporary file;
then each other precision in turn reads the windows, is scored against the file, and answers
its QA set, so each row is ready as soon as its own work is done and only the precision being
read need be built (``Engine.lean``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine.generate import Cancel, is_cancelled
from tutor.lab.cache import cache_file, cache_key, read_json, write_json
from tutor.lab.divergence import Reference, SpooledReferences, Tally
from tutor.lab.windows import WINDOW, lesson_windows, pick_windows
from tutor.library.content import Library
from tutor.paths import cache_dir

if TYPE_CHECKING:
    import torch

    from tutor.engine import Engine

REFERENCE = "bf16"
METHOD_VERSION = 2  # 2: windows read in batches, QA settings and question texts in the key
# Windows per forward pass. Against 4 on the AVX2 EPYC: quick plan 135 s vs 130 s, engine peak
# 1905 vs 2043 MiB, and Esc waits for one pass of two windows, not four.
BATCH = 2
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class Cancelled(Exception):
    """The measurement was cancelled; rows not finished were not cached."""


def check_cancel(cancel: Cancel) -> None:
    if is_cancelled(cancel):
        raise Cancelled("The quality measurement was cancelled; unfinished rows were not cached.")


def method_text(
    window: int = WINDOW,
    *,
    windows: int | None = None,
    of_windows: int | None = None,
    tokens: int | None = None,
    qa_questions: int = 0,
    max_new_tokens: int | None = None,
) -> str:
    """What was measured; with ``windows`` etc. given, the counts of this measurement."""
    if windows is None:
        what = f"all lesson text in windows of {window} tokens, second half of each scored"
    else:
        if of_windows is None or windows >= of_windows:
            which = f"all {windows} lesson windows of {window} tokens"
        else:
            which = f"{windows} of the {of_windows} lesson windows of {window} tokens, evenly spread"
        what = which + ", second half of each scored"
        if tokens is not None:
            what += f" ({tokens:,} tokens per precision)"
    qa = (
        f"QA on {qa_questions} evaluation question{'s' if qa_questions != 1 else ''}, answered by the "
        "tutor (greedy, at most 3 sentences"
        + (f" / {max_new_tokens} new tokens" if max_new_tokens is not None else "")
        + f" at every precision): token F1 of each answer against the {REFERENCE} answer, and "
        "groundedness = share of generated sentences the support check marks supported"
        if qa_questions
        else "no QA"
    )
    return (
        f"{what} (llama.cpp perplexity --kl-divergence style); PPL = exp(mean NLL); KL = mean "
        f"KL({REFERENCE} ‖ precision) over the next-token distributions; same top token = argmax "
        f"agreement with {REFERENCE}; {qa}"
    )


@dataclass(frozen=True)
class QAResult:
    """One generated answer of the QA set, and its support check."""

    text: str
    supported: int  # generated sentences the support check found in the lesson
    sentences: int


@dataclass
class QualityRow:
    precision: str
    weights_mib: float
    perplexity: float
    ppl_ratio: float
    kl_mean: float
    top1_agreement: float  # 0..1
    tokens_scored: int
    qa_token_f1: float | None = None
    groundedness: float | None = None
    qa_questions: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cells(self) -> list[str]:
        """The row as the lab's tables show it (the CLI's and the TUI's alike)."""
        return [
            self.precision,
            f"{self.weights_mib:.0f}",
            f"{self.perplexity:.2f}",
            f"{self.ppl_ratio:.3f}",
            f"{self.kl_mean:.4f}",
            f"{self.top1_agreement:.1%}",
            "—" if self.qa_token_f1 is None else f"{self.qa_token_f1:.2f}",
            "—" if self.groundedness is None else f"{self.groundedness:.0%}",
        ]


OnRow = Callable[[QualityRow], None]


def batch_invariant(engine: Engine, precision: str) -> bool:
    """Whether reading windows together gives each the same result as reading it alone.

    Not for LLM.int8 with its outlier threshold: bitsandbytes picks the outlier columns (kept
    in 16-bit) over every row of the input, so in a batch one window's outliers would change
    another's result (and flatter int8). Those read one window per pass, as the tutor reads
    a prompt.
    """
    return not (precision == "int8" and engine.int8_threshold > 0)


def _batch_logits(engine: Engine, batch: Any, half: int, together: bool = True) -> torch.Tensor:
    """``(B, T - half - 1, vocab)`` logits of the positions that have a target, float32.

    One forward pass for the whole batch when ``together``, else one per window.
    """
    per_pass = int(batch.shape[0]) if together else 1
    return engine.window_logits(batch, start=half, batch_size=per_pass)[:, :-1]


def _scores(
    engine: Engine,
    windows: Sequence[Sequence[int]],
    precisions: Sequence[str],
    *,
    batch_size: int = BATCH,
    folder: Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> Iterator[tuple[str, Tally]]:
    """Yield ``(precision, tally)`` for the reference and then each precision, as each is final.

    Precision by precision: the reference reads every window and its distributions go to a
    temporary file (``SpooledReferences``, under ``folder``'s cache); each other precision
    then reads the windows and is scored against them, one window's reference in memory at a
    time. Each precision is yielded while it is still installed, so the caller may use it (e.g.
    answer its QA set) before the next is built. ``progress("windows", done, total)`` counts
    window passes (a window read at one precision). Leaves the reference installed.
    """
    import torch

    order = [REFERENCE, *[p for p in dict.fromkeys(precisions) if p != REFERENCE]]
    if not windows:
        raise ValueError("no lesson windows to score (the lessons are shorter than one window)")
    length = len(windows[0])
    half = length // 2
    ids = torch.tensor([list(w) for w in windows], dtype=torch.long)
    targets = ids[:, half + 1 :]
    step = max(1, batch_size)
    batches = [range(first, min(first + step, len(windows))) for first in range(0, len(windows), step)]
    total, done = len(windows) * len(order), 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress("windows", done, total)

    def read(precision: str, part: range, tally: Tally) -> torch.Tensor:
        check_cancel(cancel)
        engine.switch(precision, wait=True)
        tally.weights_mib = engine.weights(precision).weights_mib
        batch = ids[part.start : part.stop]
        return _batch_logits(engine, batch, half, batch_invariant(engine, precision))

    if progress is not None:
        progress("windows", 0, total)
    with SpooledReferences((folder or cache_dir()) / "cliff") as held:
        tally = Tally()
        for part in batches:
            logits = read(REFERENCE, part, tally)
            for row, index in zip(logits, part, strict=True):
                reference = Reference.from_logits(row, targets[index])
                tally.add_reference(reference, targets[index].numel())
                held.append(reference)
            del logits, reference
            advance(len(part))
        yield REFERENCE, tally
        for precision in order[1:]:
            # Back to the reference first: a lean engine drops the last one before the next is built.
            engine.switch(REFERENCE, wait=True)
            tally = Tally()
            for part in batches:
                logits = read(precision, part, tally)
                for row, index in zip(logits, part, strict=True):
                    tally.add(row, targets[index], held[index])
                del logits
                advance(len(part))
            yield precision, tally
    engine.switch(REFERENCE, wait=True)


def score_windows(
    engine: Engine,
    windows: Sequence[Sequence[int]],
    precisions: Sequence[str],
    progress: Progress | None = None,
    *,
    batch_size: int = BATCH,
    folder: Path | None = None,
    cancel: Cancel = None,
) -> dict[str, Tally]:
    """Tally PPL, KL and top-1 agreement of every precision against the reference.

    Leaves the reference installed. Raises Cancelled between batches when ``cancel`` is set.
    """
    tallies = dict(
        _scores(
            engine,
            windows,
            precisions,
            batch_size=batch_size,
            folder=folder,
            progress=progress,
            cancel=cancel,
        )
    )
    return {p: tallies[p] for p in precisions}


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style token F1 between two answers (lowercased words)."""
    a, b = (re.findall(r"[a-z0-9]+", text.lower()) for text in (answer, reference))
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def _cache_file(key: dict[str, Any], folder: Path | None) -> Path:
    return cache_file(key, folder, key["precision"])


def _read_row(path: Path) -> QualityRow | None:
    data = read_json(path)
    try:
        return QualityRow(**data) if isinstance(data, dict) else None
    except TypeError:  # written by another version of the row
        return None


def quality_rows(
    engine: Engine,
    library: Library,
    precisions: Sequence[str],
    *,
    window: int = WINDOW,
    max_windows: int | None = None,
    spread: int | None = None,
    qa: Callable[[str], list[QAResult]] | None = None,
    qa_precisions: Collection[str] | None = None,
    qa_label: str = "",
    folder: Path | None = None,
    progress: Progress | None = None,
    on_row: OnRow | None = None,
    cancel: Cancel = None,
    batch_size: int = BATCH,
) -> list[QualityRow]:
    """One row per precision, from the cache where the same measurement was made before.

    Windows: the first ``max_windows`` of all lesson text, or ``spread`` of them evenly spread
    over it, or all. ``qa(precision)`` (optional) answers the QA set at that precision, in a
    fixed order, for ``qa_precisions`` only if given (the reference's answers, which the others
    are compared with, only when one of those is measured); ``qa_label`` names that set (and its
    settings) in the cache key.
    ``on_row(row)`` gets each row as soon as it is final: cached rows at once, then the
    reference first, then the others in the order given. ``cancel`` (an Event or a callable)
    raises Cancelled between batches and questions; only finished rows are ever cached.
    """
    windows = lesson_windows(engine.tokenizer, library, window)
    of_windows = len(windows)
    picked = pick_windows(of_windows, first=max_windows, spread=spread)
    windows = [windows[i] for i in picked]
    base = cache_key(
        engine,
        library,
        window=window,
        windows=picked if len(picked) < of_windows else len(picked),
        qa=qa_label if qa is not None else "",
        version=METHOD_VERSION,
    )
    rows: dict[str, QualityRow] = {}
    for precision in dict.fromkeys(precisions):
        row = _read_row(_cache_file({**base, "precision": precision}, folder))
        if row is not None:
            rows[precision] = row
            if on_row is not None:
                on_row(row)
    missing = [p for p in dict.fromkeys(precisions) if p not in rows]
    answered = [p for p in missing if qa is not None and (qa_precisions is None or p in qa_precisions)]
    if answered:
        answered.append(REFERENCE)
    if missing:
        check_cancel(cancel)
        reference_ppl = math.nan
        reference_answers: list[QAResult] = []
        for precision, tally in _scores(
            engine,
            windows,
            missing,
            batch_size=batch_size,
            folder=folder,
            progress=progress,
            cancel=cancel,
        ):
            ppl = math.exp(tally.nll / tally.tokens)
            answers = qa(precision) if qa is not None and precision in answered else []
            check_cancel(cancel)
            if precision == REFERENCE:
                reference_ppl, reference_answers = ppl, answers
                if precision not in missing:
                    continue
            row = QualityRow(
                precision=precision,
                weights_mib=tally.weights_mib,
                perplexity=ppl,
                ppl_ratio=ppl / reference_ppl,
                kl_mean=max(0.0, tally.kl / tally.tokens),
                top1_agreement=tally.same_top / tally.tokens,
                tokens_scored=tally.tokens,
            )
            if answers:
                row.qa_token_f1 = sum(
                    token_f1(a.text, b.text) for a, b in zip(answers, reference_answers, strict=True)
                ) / len(answers)
                sentences = sum(a.sentences for a in answers)
                row.groundedness = sum(a.supported for a in answers) / sentences if sentences else None
                row.qa_questions = len(answers)
            write_json(_cache_file({**base, "precision": precision}, folder), row.as_dict())
            rows[precision] = row
            if on_row is not None:
                on_row(row)
    return [rows[p] for p in precisions]
