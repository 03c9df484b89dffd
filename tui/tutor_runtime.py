"""The tutor's model and lesson index, loaded once per app in a background thread.

Lessons, practice and quiz never wait for this: the study screen asks for it when the
tutor tab first opens, and every chat shares the one engine and index.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tutor.content import Library

if TYPE_CHECKING:
    from tutor.engine import Engine
    from tutor.engine.reports import LoadProgress
    from tutor.retrieval import Retriever

LOADING, READY, FAILED, IDLE = "loading", "ready", "failed", "idle"


@dataclass
class TutorRuntime:
    library: Library
    model: str | None = None
    device: str = "cpu"
    cache_dir: Path | None = None  # None: tutor.paths.cache_dir()
    state: str = IDLE
    detail: str = ""
    fraction: float = 0.0
    error: str = ""
    engine: Engine | None = None
    retriever: Retriever | None = None
    switching: str | None = None  # precision a switch is building right now
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.state == READY and self.engine is not None and self.retriever is not None

    def badge(self) -> str:
        """The header badge: precision and weights memory, or what is happening."""
        if self.ready:
            assert self.engine is not None
            weights = self.engine.weights()
            text = f"tutor {self.engine.precision} · {weights.weights_mib:.0f} MiB"
            return f"{text} · switching to {self.switching}…" if self.switching else text
        if self.state == LOADING:
            return f"tutor loading {round(self.fraction * 100)}%"
        if self.state == FAILED:
            return "tutor unavailable"
        return "tutor not loaded"

    def load(self, changed: Callable[[], None]) -> None:
        """Load index then model (blocking: run in a thread); ``changed`` is called on each step."""
        with self._lock:
            if self.state in (LOADING, READY):
                return
            self.state, self.error = LOADING, ""
        changed()
        try:
            from tutor.engine import Engine, EngineError
            from tutor.engine.memory import cpu_count
            from tutor.retrieval import Retriever

            self.detail = "indexing the lessons"
            changed()
            self.retriever = Retriever.load(self.library, cache_dir=self.cache_dir)

            def progress(step: LoadProgress) -> None:
                self.detail = f"{step.stage}: {step.message}".strip(": ")
                self.fraction = step.fraction
                changed()

            # One core stays free for the interface: with every core decoding, a redraw stalls the reply.
            threads = max(1, cpu_count() - 1)
            self.engine = Engine.load(
                self.model, device=self.device, progress=progress, cache_dir=self.cache_dir, threads=threads
            )
            self.state, self.detail, self.fraction = READY, "", 1.0
        except EngineError as exc:
            self.state, self.error = FAILED, str(exc)
        except Exception as exc:
            self.state, self.error = FAILED, f"{type(exc).__name__}: {exc}"
        changed()
