"""Memory beyond weights: what a running model holds at a given context length, per precision.

For each precision and context length, four parts, each measured:

* weights: every parameter and quantization-state tensor the model computes with at that
  precision (as the cliff table's "weights MiB");
* KV cache: the keys and values buffer a reply of that many tokens fills (its tensor's bytes);
* activations: the peak of torch's allocations while that many tokens of lesson text are read
  into the buffer, above what was allocated before (the profiler's record of every allocation
  and free);
* runtime: the engine process's resident set before these reads minus every weight tensor it
  holds (the bf16 masters and each prepared precision): the interpreter, torch and its
  libraries, the tokenizer, the embedding model, and heap the allocator kept from earlier work.

Weight bits shrink only the first part; the KV cache and activations stay 16-bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine.memory import large_blocks_mapped
from tutor.engine.precisions import PRECISIONS
from tutor.engine.reports import MIB
from tutor.lab.cache import cache_file, cache_key, read_json, write_json
from tutor.lab.measure import REFERENCE, Cancel, Progress, check_cancel
from tutor.lab.windows import lesson_windows
from tutor.library.content import Library

if TYPE_CHECKING:
    from tutor.engine import Engine

CONTEXTS = (256, 1024, 2048)
VERSION = 1


@dataclass(frozen=True)
class FootprintRow:
    precision: str
    context: int  # tokens read
    weights_mib: float
    kv_cache_mib: float
    activations_mib: float
    runtime_mib: float

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.kv_cache_mib + self.activations_mib + self.runtime_mib

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lesson_tokens(engine: Engine, library: Library, count: int) -> list[int]:
    """The first ``count`` tokens of the lessons' text (real text, not filler)."""
    ids = [token for window in lesson_windows(engine.tokenizer, library, 64) for token in window]
    if len(ids) < count:
        raise ValueError(f"the lessons hold {len(ids)} tokens, fewer than the {count} asked for")
    return ids[:count]


def footprint_rows(
    engine: Engine,
    library: Library,
    precisions: Sequence[str],
    contexts: Sequence[int] = CONTEXTS,
    *,
    folder: Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> list[FootprintRow]:
    """One row per precision (bf16 first) and context length, from the cache where measured before."""
    key = cache_key(engine, library, contexts=list(contexts), version=VERSION)
    order = list(dict.fromkeys([REFERENCE, *precisions]))
    # Visited fewest bits first, so each is built beside the last one measured, which a lean
    # engine still holds: int8 built beside bf16's 212 MB packed copy was the full measure's top.
    visits = sorted(order, key=lambda p: -1 if p == REFERENCE else PRECISIONS[p].bits)
    rows: list[FootprintRow] = []
    # Once, before any read: a prefill's scratch, freed, may stay in the process's heap after.
    held = {name: value or 0.0 for name, value in engine.memory().items()}
    runtime = held["rss_mib"] - held["master_mib"] - held["prepared_mib"]
    text: list[int] = []  # tokenized once, when something is measured
    for done, precision in enumerate(visits):
        path = cache_file({**key, "precision": precision}, folder, f"footprint-{precision}")
        with contextlib.suppress(TypeError):  # absent, or another version's rows
            rows += [FootprintRow(**row) for row in read_json(path)]
            continue
        check_cancel(cancel)
        if progress is not None:
            progress("memory", done, len(order))
        text = text or lesson_tokens(engine, library, max(contexts))
        engine.switch(precision, wait=True)
        weights = engine.weights(precision).weights_bytes
        measured = []
        for context in contexts:
            check_cancel(cancel)
            with large_blocks_mapped():  # LLM.int8's long reads would leave the heap gigabytes larger
                kv, activations = engine.prefill_footprint(text[:context])
            measured.append(
                FootprintRow(
                    precision,
                    context,
                    round(weights / MIB, 1),
                    round(kv / MIB, 2),
                    round(activations / MIB, 2),
                    round(runtime, 1),
                )
            )
        write_json(path, [row.as_dict() for row in measured])
        rows += measured
    if progress is not None:
        progress("memory", len(order), len(order))
    return sorted(rows, key=lambda row: order.index(row.precision))
