"""The quality cliff estimated on a remote server (``quant-tutor cliff --engine URL``).

The local Lab reads every next-token distribution in full. A server returns at most the top
few log-probabilities per token (an OpenAI completion with ``echo`` and ``logprobs``), so here:

* PPL is exact up to the server's own arithmetic: each scored token's log-probability is
  returned whatever its rank.
* KL(reference ‖ variant) is an estimate over the reference's top ``TOP`` tokens at each
  place: Σ p(t)·(log p(t) − log q(t)). A token missing from the variant's top list is given
  the variant's lowest listed log-probability, which is at least its own, so such a term is
  too small; the reference's mass outside its top list is left out.
* Same top token: the two lists' first entries agree.

The text is the lessons' own, cut into windows of about ``WINDOW_CHARS`` characters at word
ends (the server tokenizes; every variant of one model tokenizes alike); the second half of
each window's tokens is scored, as locally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tutor.engine.generate import Cancel
from tutor.engine.remote import RemoteEngine, RemoteError
from tutor.lab.divergence import Sums
from tutor.lab.measure import REFERENCE, Progress, check_cancel
from tutor.lab.windows import lesson_text, pick_windows
from tutor.library.content import Library

TOP = 5  # log-probabilities per place: OpenAI's limit, and what most servers return
WINDOW_CHARS = 1000  # about 256 tokens of English for a Llama-family tokenizer
WINDOWS = 12  # windows spread over the lessons that each variant scores, unless asked otherwise


@dataclass(frozen=True)
class EstimateRow:
    precision: str
    served: str  # the model id that answered
    ppl: float
    ppl_ratio: float
    kl_estimate: float
    same_top: float  # share of scored places
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_windows(library: Library, chars: int = WINDOW_CHARS) -> list[str]:
    """All lesson text in windows of about ``chars`` characters, each cut at a space or line end
    (the cut itself dropped; the last partial window too)."""
    text = "".join(lesson_text(lesson) for lesson in library.ordered())
    windows, start = [], 0
    while len(text) - start >= chars:
        end = max(text.rfind(" ", start, start + chars), text.rfind("\n", start, start + chars))
        end = end if end > start else start + chars
        windows.append(text[start:end])
        start = end + 1
    return windows


class _Tally(Sums):
    def add(
        self, chosen: Sequence[float], tops: Sequence[dict[str, float]], reference: Sequence[dict[str, float]]
    ) -> None:
        half = len(chosen) // 2
        for value, mine, theirs in zip(chosen[half:], tops[half:], reference[half:], strict=True):
            self.nll -= value
            self.tokens += 1
            if not (mine and theirs):
                continue
            floor = min(mine.values())
            self.kl += sum(math.exp(p) * (p - mine.get(token, floor)) for token, p in theirs.items())
            self.same_top += max(mine, key=mine.__getitem__) == max(theirs, key=theirs.__getitem__)


def estimate_rows(
    remote: RemoteEngine,
    library: Library,
    precisions: Sequence[str],
    *,
    windows: int = WINDOWS,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> list[EstimateRow]:
    """One row per served variant among ``precisions`` (the reference first), each window asked
    of each variant; leaves the remote at the variant it had."""
    texts = text_windows(library)
    texts = [texts[i] for i in pick_windows(len(texts), spread=windows)]
    order = [REFERENCE, *[p for p in dict.fromkeys(precisions) if p != REFERENCE]]
    missing = [p for p in order if p not in remote.variants]
    if missing:
        served = ", ".join(remote.variants)
        raise RemoteError(
            f"{remote.base_url} serves no variant for {', '.join(missing)}; it serves: {served}"
        )
    previous = remote.precision
    reference: list[list[dict[str, float]]] = []
    rows: list[EstimateRow] = []
    try:
        for number, precision in enumerate(order):
            remote.switch(precision)
            tally = _Tally()
            for index, text in enumerate(texts):
                check_cancel(cancel)
                chosen, tops = remote.prompt_logprobs(text, TOP)
                if number == 0:
                    reference.append(tops)
                elif len(tops) != len(reference[index]):
                    raise RemoteError(
                        f"{precision} read window {index + 1} as {len(tops)} tokens and {REFERENCE} as "
                        f"{len(reference[index])}: the variants are not one model's"
                    )
                tally.add(chosen, tops, reference[index])
                if progress is not None:
                    progress("windows", number * len(texts) + index + 1, len(order) * len(texts))
            ppl = math.exp(tally.nll / max(tally.tokens, 1))
            rows.append(
                EstimateRow(
                    precision,
                    remote.variants[precision].model,
                    ppl,
                    ppl / rows[0].ppl if rows else 1.0,
                    tally.kl / max(tally.tokens, 1),
                    tally.same_top / max(tally.tokens, 1),
                    tally.tokens,
                )
            )
    finally:
        remote.switch(previous)
    return rows


def method_text(rows: Sequence[EstimateRow], windows: int, url: str) -> str:
    tokens = rows[0].tokens if rows else 0
    return (
        f"Estimated on {url}: {windows} windows of lesson text (about {WINDOW_CHARS} characters each), "
        f"second half of each scored ({tokens} tokens per variant); PPL from the log-probability the "
        f"server returned for each token; KL(bf16 ‖ variant) estimated over bf16's top {TOP} tokens at "
        f"each place (a token outside the variant's top {TOP} given its lowest listed log-probability, "
        f"so the estimate runs low); same top token from the two top lists. The local engine measures "
        f"the full distributions: quant-tutor cliff without --engine."
    )
