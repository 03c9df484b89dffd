"""The app's handle on its engine process: start it, follow its loading, notice when it dies.

The model, the lesson index and every measurement live in a child process (see
``tutor.engine.process``); this side holds only a client, so the UI never imports torch and
a reply never takes turns with the renderer for one interpreter. Lessons, practice and quiz
never wait for it: the study screen starts it when the tutor or lab tab first opens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from tutor.engine.client import EngineClient, EngineGone, EngineRefused
from tutor.engine.precisions import PRECISIONS
from tutor.engine.process import EngineProcess, EngineStartError
from tutor.engine.settings import EngineSettings
from tutor.library.content import Library

POLL_S = 0.2  # how often loading progress is read while the engine loads
INDEX_POLL_S = 1.0  # how often, once ready, the background indexing of a big library is read


class TutorState(Enum):
    IDLE = "idle"  # not started yet
    LOADING = "loading"  # the process is starting or loading the model
    READY = "ready"
    FAILED = "failed"  # the model could not load; the message says why
    STOPPED = "stopped"  # the engine process died; the next question restarts it


@dataclass
class TutorRuntime:
    library: Library
    model: str | None = None
    device: str = "cpu"
    cache_dir: Path | None = None  # None: tutor.paths.cache_dir()
    threads: int | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)  # local, or a remote server's
    state: TutorState = TutorState.IDLE
    detail: str = ""
    fraction: float = 0.0
    error: str = ""
    precision: str = "bf16"  # what the learner chose: every question runs at it
    weights_mib: float | None = None  # of ``precision``, as the engine measured it
    switching: str | None = None  # the precision a switch is building right now
    indexing: tuple[int, int] | None = None  # (lessons searched, of) while the engine indexes the rest
    process: EngineProcess | None = None
    client: EngineClient | None = None
    keep_engine: bool = False  # the process is someone else's (a test's shared engine): never stop it
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def remote(self) -> str | None:
        """The server that generates the replies (None: the local model)."""
        return self.settings.url

    @property
    def ready(self) -> bool:
        return self.state is TutorState.READY and self.client is not None

    def badge(self) -> str:
        """The header badge: precision and weights memory, or what is happening."""
        if self.ready:
            weights = "" if self.weights_mib is None else f" · {self.weights_mib:.0f} MiB"
            where = "" if self.remote is None else " · remote"
            text = f"tutor {self.precision}{weights}{where}"
            if not self.switching:
                return text
            info = PRECISIONS.get(self.switching)
            first = info.first_build if info is not None else ""
            return f"{text} · switching to {self.switching}{f' ({first})' if first else ''}…"
        if self.state is TutorState.LOADING:
            return f"tutor loading {round(self.fraction * 100)}%"
        if self.state is TutorState.FAILED:
            return "tutor unavailable"
        if self.state is TutorState.STOPPED:
            return "tutor stopped"
        return "tutor not loaded"

    def load(self, changed: Callable[[], None], lesson_id: str | None = None) -> None:
        """Start the engine process and follow it until the model is ready (blocking: a worker runs it).

        ``changed`` is called whenever what the learner sees would change; ``lesson_id``, the
        lesson the learner has open, is indexed (with its related ones) before the others.
        """
        with self._lock:
            if self.state in (TutorState.LOADING, TutorState.READY):
                return
            self.state, self.error, self.detail, self.fraction = (
                TutorState.LOADING,
                "",
                "starting the engine",
                0.0,
            )
        changed()
        try:
            client = self._start(lesson_id)
            self._follow(client, changed)
        except (EngineStartError, EngineGone, EngineRefused) as exc:
            self.state, self.error = TutorState.FAILED, str(exc)
        changed()

    def spawn(self, lesson_id: str | None) -> None:
        """Start the engine process now and return at once: ``load`` later finds it running.

        The app calls this before Textual starts, so the model's imports and the app's first
        frame share the cores instead of following each other (about a second sooner ready)."""
        process = self._process(lesson_id)
        if not process.alive():
            process.spawn()

    def _process(self, lesson_id: str | None) -> EngineProcess:
        if self.process is None:
            self.process = EngineProcess(
                model=self.model,
                device=self.device,
                content=self.library.root,
                cache_dir=self.cache_dir,
                threads=self.threads,
                settings=self.settings,
            )
        self.process.lesson = lesson_id
        return self.process

    def _start(self, lesson_id: str | None) -> EngineClient:
        if self.client is not None:
            self.client.close()
            self.client = None
        process = self._process(lesson_id)
        return process.answering() if process.alive() else process.start()

    def _follow(self, client: EngineClient, changed: Callable[[], None]) -> None:
        shown: tuple[str, str, int] | None = None
        while True:
            status = client.status()
            if status["state"] == "failed":
                client.close()
                self.state, self.error = TutorState.FAILED, status["error"]
                return
            if status["state"] == "ready":
                break
            self.detail, self.fraction = status["detail"], status["fraction"]
            now = (status["stage"], self.detail, round(self.fraction * 100))
            if now != shown:
                shown = now
                changed()
            time.sleep(POLL_S)
        if status.get("precision") != self.precision:
            # A restarted engine comes back at bf16; the learner's choice stands.
            status = {**status, "weights_mib": client.switch(self.precision)["weights_mib"]}
        self.weights_mib = status.get("weights_mib")
        self.client, self.state, self.detail, self.fraction = client, TutorState.READY, "", 1.0

    def cancel(self, request_id: str, failed: Callable[[str], None]) -> None:
        """Tell the engine to stop ``request_id`` from a thread of its own, so Esc never waits on
        the socket; ``failed(reason)`` is called from that thread if the engine could not be told.

        A reader loop that closes its stream notices only at the stream's next event; while the
        engine quantizes a precision or waits for another job no event comes, so each Esc says
        so to the engine directly (a request it has not seen yet is stopped when it arrives).
        """
        client = self.client
        if client is None:
            return

        def send() -> None:
            try:
                client.cancel(request_id)
            except (EngineGone, EngineRefused) as exc:
                failed(str(exc))

        threading.Thread(target=send, name="cancel", daemon=True).start()

    def follow_index(self, changed: Callable[[], None]) -> None:
        """Once ready, follow the engine's background indexing of a big library until every
        lesson is searched (blocking: the load worker runs it); ``changed`` when the count moves."""
        client = self.client
        while client is not None and self.client is client:
            try:
                index = client.status().get("index")
            except (EngineGone, EngineRefused):
                index = None  # the chat notices a dead engine on its own
            now = None
            if index is not None and not index["done"] and not index["error"]:
                now = (index["lessons"], index["total"])
            if now != self.indexing:
                self.indexing = now
                changed()
            if now is None:
                return
            time.sleep(INDEX_POLL_S)

    def engine_died(self, settle_s: float = 0.0) -> bool:
        """True (and the state says so) when the engine process is gone; no I/O.

        ``settle_s``: after a broken connection the child may still be on its way out; waiting
        a moment lets the learner read how it ended (killed by SIGKILL) rather than a socket error.
        """
        if self.state is not TutorState.READY or self.process is None or self.process.alive(settle_s):
            return False
        self.lost()
        return True

    def connection_lost(self, why: str) -> None:
        """A request to the engine broke: say how the process ended, or ``why`` if it runs on."""
        if not self.engine_died(settle_s=1.0):
            self.lost(why)

    def lost(self, why: str = "") -> None:
        """The engine stopped answering: say how, and let the next question restart it."""
        how = self.process.exit_description() if self.process is not None else "stopped"
        self.state = TutorState.STOPPED
        self.error = why or f"the engine process {how}"
        if self.client is not None:
            self.client.close()
            self.client = None

    def stop(self) -> None:
        """Stop the engine process (the app is quitting)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.process is not None and not self.keep_engine:
            self.process.stop()
        self.state = TutorState.IDLE
