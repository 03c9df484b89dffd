"""Switching precision on a PrecisionManager, and what each switch or build reports.

The engine's lock is not taken here: ``Engine`` holds it around these, so a reply never sees
its weights change under it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from tutor.engine.errors import SwitchError, reason
from tutor.engine.memory import give_back_freed
from tutor.engine.precisions import check_precision
from tutor.engine.reports import PrepareReport, SwitchReport

if TYPE_CHECKING:
    from tutor.engine.precision_manager import PrecisionManager


def switch_to(manager: PrecisionManager, precision: str) -> SwitchReport:
    """Install ``precision`` (built now unless prepared); on failure the previous one stays."""
    previous = manager.active
    started = time.perf_counter()
    if precision == previous:
        prepared, from_cache = manager.current(), True
    else:
        held = set(manager.prepared())
        prepared, from_cache = manager.prepare(precision)
        try:
            manager.install(prepared)
        except Exception as exc:
            raise SwitchError(
                f"Could not switch to {precision} ({reason(exc)}); still running at {previous}.",
                precision=precision,
                kept=previous,
            ) from exc
        if held - set(manager.prepared()):
            give_back_freed()  # what the bound dropped would otherwise stay in the heap
    seconds = time.perf_counter() - started
    return SwitchReport(
        precision=precision,
        previous=previous,
        seconds=round(seconds, 4),
        from_cache=from_cache,
        prepare_seconds=0.0 if from_cache else round(prepared.seconds, 4),
        weights=prepared.report,
        prepared=manager.prepared(),
        prepared_bytes=manager.prepared_bytes(),
        prepared_limit_bytes=manager.limit_bytes,
        master_bytes=manager.master_bytes,
    )


def prepare(manager: PrecisionManager, precision: str, started: float) -> PrepareReport:
    """Build ``precision`` unless it is held, without installing it; the seconds reported count
    from ``started`` (a ``perf_counter`` time: the caller's wait for the engine counts too)."""
    prepared, held = manager.prepare(precision)
    return PrepareReport(
        precision=prepared.precision,
        seconds=round(time.perf_counter() - started, 4),
        from_cache=held,
        prepared_bytes=manager.prepared_bytes(),
    )


@contextlib.contextmanager
def pinned(manager: PrecisionManager, precisions: Iterable[str]) -> Iterator[None]:
    """Keep ``precisions`` prepared inside, over the memory bound if need be (see ``Engine.pinned``)."""
    before = manager.pinned
    manager.pinned = before | {check_precision(p) for p in precisions}
    try:
        yield
    finally:
        manager.pinned = before


@contextlib.contextmanager
def lean(manager: PrecisionManager) -> Iterator[None]:
    """Inside, only the precision installed, one being built and pinned ones stay prepared
    (see ``Engine.lean``)."""
    before = manager.limit_bytes
    manager.limit_bytes = 0
    for name in manager.prepared():
        if name not in manager.pinned:
            manager.drop(name)  # never the installed one
    try:
        yield
    finally:
        manager.limit_bytes = before
