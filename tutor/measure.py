"""Quality against the reference precision, measured on the lessons' own text.

Method (after llama.cpp's ``perplexity --kl-divergence``): the plain text of every shipped
lesson is tokenized and cut into fixed windows; each window is read from scratch at every
precision and only its second half is scored, so every scored token has at least half a
window of context. Per precision: perplexity (exp of the mean negative log-likelihood),
its ratio to the reference's, the mean KL divergence KL(reference ‖ precision) of the
next-token distributions, and the share of positions where both pick the same top token.
Windows are identical for every precision. Results are cached per (model, precision,
content, method).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tutor.content import Library, plain_text
from tutor.files import write_atomic
from tutor.paths import cache_dir

if TYPE_CHECKING:
    import torch

    from tutor.engine import Engine

REFERENCE = "bf16"
WINDOW = 256
METHOD_VERSION = 1
Progress = Callable[[str, int, int], None]  # (what, done, total)


def method_text(window: int = WINDOW) -> str:
    return (
        f"all lesson text in windows of {window} tokens, second half of each scored (llama.cpp "
        f"perplexity --kl-divergence style); PPL = exp(mean NLL); KL = mean KL({REFERENCE} ‖ precision) "
        "over the next-token distributions; same top token = argmax agreement with "
        f"{REFERENCE}; QA: token F1 of each answer against the {REFERENCE} answer, and groundedness = "
        "share of generated sentences the support check marks supported"
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


def content_hash(library: Library) -> str:
    digest = hashlib.sha256()
    for lesson in library.ordered():
        digest.update(lesson.id.encode())
        digest.update(plain_text(lesson).encode())
    return digest.hexdigest()[:16]


def lesson_windows(tokenizer: Any, library: Library, window: int = WINDOW) -> list[list[int]]:
    """Fixed windows of ``window`` tokens over all lesson text (the last partial one dropped)."""
    ids: list[int] = []
    for lesson in library.ordered():
        ids += tokenizer(plain_text(lesson), add_special_tokens=False)["input_ids"]
    return [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]


@dataclass
class _Tally:
    nll: float = 0.0
    kl: float = 0.0
    same_top: int = 0
    tokens: int = 0

    def add(self, logprobs: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor) -> None:
        self.nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        self.kl += float((reference.exp() * (reference - logprobs)).sum())
        self.same_top += int((logprobs.argmax(-1) == reference.argmax(-1)).sum())
        self.tokens += targets.numel()


def score_windows(
    engine: Engine,
    windows: Sequence[Sequence[int]],
    precisions: Sequence[str],
    progress: Progress | None = None,
) -> dict[str, _Tally]:
    """Tally PPL, KL and top-1 agreement of every precision against the reference, window by window.

    Window-major, so only one window's reference distributions are held at a time; the
    engine keeps prepared precisions, so switching back and forth is a reference swap.
    """
    import torch

    tallies = {p: _Tally() for p in precisions}
    for done, window in enumerate(windows):
        ids = torch.tensor([list(window)])
        half = len(window) // 2
        targets = ids[0, half + 1 :]
        engine.switch(REFERENCE, wait=True)
        reference = engine.window_logprobs(ids, start=half)[0, :-1]
        for precision in precisions:
            if precision == REFERENCE:
                logprobs = reference
            else:
                engine.switch(precision, wait=True)
                logprobs = engine.window_logprobs(ids, start=half)[0, :-1]
            tallies[precision].add(logprobs, targets, reference)
        if progress is not None:
            progress("windows", done + 1, len(windows))
    engine.switch(REFERENCE, wait=True)
    return tallies


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
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (folder or cache_dir()) / "cliff" / f"{key['precision']}-{digest}.json"


def _write_json(data: dict[str, Any], handle: IO[bytes]) -> None:
    handle.write(json.dumps(data).encode())


def quality_rows(
    engine: Engine,
    library: Library,
    precisions: Sequence[str],
    *,
    window: int = WINDOW,
    max_windows: int | None = None,
    qa: Callable[[str], list[QAResult]] | None = None,
    qa_label: str = "",
    folder: Path | None = None,
    progress: Progress | None = None,
) -> list[QualityRow]:
    """One row per precision, from the cache where the same measurement was made before.

    ``qa(precision)`` (optional) answers the QA set at that precision, in a fixed order;
    ``qa_label`` names that set in the cache key.
    """
    windows = lesson_windows(engine.tokenizer, library, window)[:max_windows]
    base = {
        "model": str(engine.checkpoint.path),
        "device": engine.device,
        "content": content_hash(library),
        "window": window,
        "windows": len(windows),
        "qa": qa_label if qa is not None else "",
        "version": METHOD_VERSION,
    }
    cached: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        path = _cache_file({**base, "precision": precision}, folder)
        if path.exists():
            cached[precision] = json.loads(path.read_text(encoding="utf-8"))
    missing = [p for p in precisions if p not in cached]
    if missing:
        tallies = score_windows(
            engine, windows, [REFERENCE, *[p for p in missing if p != REFERENCE]], progress
        )
        reference_ppl = math.exp(tallies[REFERENCE].nll / tallies[REFERENCE].tokens)
        answers = {p: qa(p) for p in [REFERENCE, *missing]} if qa is not None else {}
        for precision in missing:
            tally = tallies[precision]
            ppl = math.exp(tally.nll / tally.tokens)
            row = QualityRow(
                precision=precision,
                weights_mib=engine.weights(precision).weights_mib,
                perplexity=ppl,
                ppl_ratio=ppl / reference_ppl,
                kl_mean=max(0.0, tally.kl / tally.tokens),
                top1_agreement=tally.same_top / tally.tokens,
                tokens_scored=tally.tokens,
            )
            if answers:
                mine, reference = answers[precision], answers[REFERENCE]
                row.qa_token_f1 = sum(
                    token_f1(a.text, b.text) for a, b in zip(mine, reference, strict=True)
                ) / len(mine)
                sentences = sum(a.sentences for a in mine)
                row.groundedness = sum(a.supported for a in mine) / sentences if sentences else None
                row.qa_questions = len(mine)
            cached[precision] = row.as_dict()
            path = _cache_file({**base, "precision": precision}, folder)
            write_atomic(path, partial(_write_json, cached[precision]))
    return [QualityRow(**cached[p]) for p in precisions]
