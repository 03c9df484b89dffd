"""Mixed precision: which layers suffer most at 4 bits, and what keeping those at int8 buys.

A sensitivity scan puts one decoder layer at a time at nf4 (the others bf16) and measures
KL(bf16 ‖ that) on lesson windows. Then variants keep the k most sensitive layers at int8 and
the rest at nf4: k = 0 is nf4, k = all is int8, and in between their memory and KL show where
the knee is. Each variant is the tutor's own modules, layer by layer (``Engine.window_logits``
with ``mix``); its weights MiB adds each layer's share of its precision's measured bytes to
what stays 16-bit everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine.memory import give_back_freed
from tutor.engine.reports import MIB
from tutor.lab.cache import cache_file, cache_key, read_json, write_json
from tutor.lab.divergence import log_softmax_
from tutor.lab.measure import REFERENCE, Cancel, Progress, check_cancel
from tutor.lab.windows import lesson_windows, pick_windows
from tutor.library.content import Library

if TYPE_CHECKING:
    import torch

    from tutor.engine import Engine

LOW, HIGH = "nf4", "int8"
SCAN_WINDOW = 128  # tokens per window; the second half of each is scored
KS = (1, 2, 4, 8, 16)  # layers kept at int8 in the variants between nf4 and int8
VERSION = 1


@dataclass(frozen=True)
class MixedRow:
    variant: str
    int8_layers: list[int]
    weights_mib: float
    kl_mean: float
    top1_agreement: float
    tokens_scored: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MixedResult:
    sensitivity: list[float]  # KL when only layer i is at nf4
    rows: list[MixedRow]  # nf4, the variants by k, int8

    def as_dict(self) -> dict[str, Any]:
        return {"sensitivity": self.sensitivity, "rows": [r.as_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixedResult:
        return cls(data["sensitivity"], [MixedRow(**r) for r in data["rows"]])


ROWS = 64  # positions scored at a time: each step's full-vocabulary temporaries stay a few MB


def _divergence(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference ‖ logits) and top-1 agreement over ``(windows, positions, vocab)``
    (``logits`` as computed, in float32 ``ROWS`` positions at a time: all of them at once held
    four temporaries of every position's vocabulary, 75 MB each)."""
    kl, same = 0.0, 0
    for ref_window, window in zip(reference, logits, strict=True):
        for ref, rows in zip(ref_window.split(ROWS), window.split(ROWS), strict=True):
            logprobs = rows.float().log_softmax(-1)
            kl += float((ref.exp() * (ref - logprobs)).sum())
            same += int((logprobs.argmax(-1) == ref.argmax(-1)).sum())
    count = positions(reference)
    return max(0.0, kl / count), same / count


def positions(scores: torch.Tensor) -> int:
    """The scored positions of ``(windows, positions, vocab)``."""
    return int(scores.shape[0]) * int(scores.shape[1])


def mixed_precision(
    engine: Engine,
    library: Library,
    *,
    windows: int,
    window: int = SCAN_WINDOW,
    ks: Sequence[int] = KS,
    folder: Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> MixedResult:
    """The scan and the variants (cached: measured once per model, lessons and settings)."""
    import torch

    from tutor.engine.decoder import Residuals

    layers = int(engine.model.config.num_hidden_layers)
    ks = sorted({k for k in ks if 0 < k < layers})
    every = lesson_windows(engine.tokenizer, library, window)
    ids = [every[i] for i in pick_windows(len(every), spread=windows)]
    path = cache_file(cache_key(engine, library, windows=ids, ks=ks, version=VERSION), folder, "mixed")
    with contextlib.suppress(TypeError, KeyError):  # absent, or another version's result
        return MixedResult.from_dict(read_json(path))
    half = window // 2
    steps, done = layers + len(ks) + 2, 0

    def read(mix: Sequence[str] | None, residuals: Residuals | None = None) -> torch.Tensor:
        nonlocal done
        check_cancel(cancel)
        # One window per pass where int8 is in: LLM.int8's outlier columns span the batch.
        together = mix is None or HIGH not in mix
        logits = engine.window_logits(
            ids,
            start=half,
            batch_size=len(ids) if together else 1,
            mix=mix,
            residuals=residuals,
            as_computed=True,  # in bf16, half float32's bytes: _divergence widens a few rows at a time
        )
        if mix is not None:
            done += 1
            if progress is not None:
                progress("mixed precision", done, steps)
        return logits[:, :-1]  # a view: a copy of every position's vocabulary is 75 MB

    if progress is not None:
        progress("mixed precision", 0, steps)
    engine.switch(REFERENCE, wait=True)
    rows = []
    with engine.pinned([LOW, HIGH]):  # the scan reads nf4, every variant both: a lean engine keeps them
        # Built first: its scratch on top of the reference's scores and the recorded stream was
        # the full Lab measure's peak.
        engine.prepare(LOW)
        # The scan's layers before the one at nf4 are bf16's: each pass starts at that layer from
        # the stream the reference pass recorded (about half the scan's compute).
        entering = Residuals()
        reference = log_softmax_(read(None, entering).to(torch.float32, copy=True))
        sensitivity = []
        for layer in range(layers):
            mix = [REFERENCE] * layers
            mix[layer] = LOW
            sensitivity.append(_divergence(reference, read(mix, replace(entering, first=layer)))[0])
        del entering  # the variants start at the first layer: the recorded stream is 26 MB
        order = sorted(range(layers), key=lambda i: -sensitivity[i])
        # At nf4, a lean engine drops bf16's packed copy, which no variant reads; int8 is built once.
        engine.switch(LOW, wait=True)
        engine.prepare(HIGH)
        give_back_freed()  # the build's scratch, before the variants' reads land on it
        kept = engine.weights(LOW).kept_bytes  # what stays 16-bit, the same at every precision
        per_layer = {p: (engine.weights(p).weights_bytes - kept) / layers for p in (LOW, HIGH)}
        for k in [0, *ks, layers]:
            chosen = sorted(order[:k])
            mix = [HIGH if i in chosen else LOW for i in range(layers)]
            kl, same = _divergence(reference, read(mix))
            variant = LOW if k == 0 else HIGH if k == layers else f"{LOW} + {k} at {HIGH}"
            weights = kept + k * per_layer[HIGH] + (layers - k) * per_layer[LOW]
            rows.append(MixedRow(variant, chosen, round(weights / MIB, 1), kl, same, positions(reference)))
    result = MixedResult(sensitivity, rows)
    write_json(path, result.as_dict())
    return result
