"""What the engine process holds: the model, the lesson index, and one job at a time on them.

A job (a tutor answer, a chat completion, a switch, a Lab measurement) names the precision it
runs at; the host switches and runs it under one lock, so no other job changes the precision
in between and the precision a reply reports is the one that wrote it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine import threads
from tutor.engine.errors import EngineError
from tutor.engine.precisions import PRECISIONS, check_precision
from tutor.engine.protocol import MODEL_NAME
from tutor.engine.remote import RemoteEngine
from tutor.engine.settings import EngineSettings
from tutor.library.content import Library
from tutor.service.wire import prepared_dict, prompt_logprobs_dict

if TYPE_CHECKING:
    from tutor.assistant.grounding import PreparedAnswer, TutorAnswer
    from tutor.assistant.retrieval import Retriever
    from tutor.engine import Engine, Reply, TokenEvent
    from tutor.engine.reports import LoadProgress

STARTING, LOADING, READY, FAILED = "starting", "loading", "ready", "failed"
TOKEN_PACE_S = 0.04  # a reply's tokens are sent together at most this often (the app draws every 0.08 s)
LAB_NEEDS_LOCAL = (
    "The Lab reads the model's own log-probabilities for every token, so it measures with the "
    "local engine; this tutor's replies come from {url}. Start quant-tutor without --engine to measure, "
    "or estimate PPL and KL from that server's log-probabilities: quant-tutor cliff --engine {url}"
)
Emit = Callable[[str, Any], None]


class NotReadyError(Exception):
    """The model is still loading (or failed to): the request can't run yet."""


class Cancelled(Exception):
    """The job was cancelled while it waited for the engine."""


@dataclass
class EngineHost:
    library: Library
    lesson: str | None = None  # the lesson the learner has open: indexed, with its related ones, first
    model: str | None = None
    device: str = "cpu"
    cache_dir: Path | None = None
    threads: int | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)  # local, or a server that generates
    state: str = STARTING
    stage: str = ""
    detail: str = ""
    fraction: float = 0.0
    error: str = ""
    index_error: str = ""  # why the background indexing stopped (the lessons indexed stay searched)
    load_seconds: float | None = None
    engine: Engine | RemoteEngine | None = None
    retriever: Retriever | None = None
    job: str = ""  # what holds the engine now, for the "waiting for …" notice
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _idle: threading.Event = field(default_factory=threading.Event)  # set while no job runs
    _cancels: dict[str, threading.Event] = field(default_factory=dict)
    # Ids cancelled before their request arrived (Esc right after Enter): honoured when it does.
    _early: deque[str] = field(default_factory=lambda: deque(maxlen=64))

    def __post_init__(self) -> None:
        self._idle.set()

    # --- loading ---------------------------------------------------------------------

    def load(self) -> None:
        """Index the learner's lesson and its related ones, load the embedding model and the model,
        then warm bitsandbytes and index the other lessons (blocking; the server runs it in a thread).

        One after the other: most of each is imports, and importing transformers from two threads
        at once saved about a second here but failed one start in seven (an import deadlock).
        """
        started = time.perf_counter()
        self.state = LOADING
        try:
            from tutor.assistant.chunks import lesson_and_related
            from tutor.assistant.retrieval import Retriever

            def index_progress(message: str, fraction: float) -> None:
                self.stage, self.detail, self.fraction = "index", message, 0.1 * fraction

            self.retriever = Retriever.load(
                self.library,
                progress=index_progress,
                cache_dir=self.cache_dir,
                lessons=lesson_and_related(self.library, self.lesson),
            )
            # Before the model, not after ready: every question's retrieval needs it, so a
            # question asked right at ready would wait for it (0.7 s on the AVX-512 EPYC).
            self.stage, self.detail = "index", "loading the embedding model"
            self.retriever.warm()
            self.engine = self._load_model()
            self.load_seconds = round(time.perf_counter() - started, 2)
            self.state, self.stage, self.detail, self.fraction = READY, "", "", 1.0
        except EngineError as exc:
            self.state, self.error = FAILED, str(exc)
        except Exception as exc:
            self.state, self.error = FAILED, f"{type(exc).__name__}: {exc}"
        else:
            # This thread ran the model's load, so it holds an OpenMP team: it ends now, and
            # what follows ready runs in threads of its own (tutor.engine.threads).
            threads.start(self._after_ready, "after ready")

    def _after_ready(self) -> None:
        """Import bitsandbytes, then index the other lessons.

        After ready, not before: the first question does not wait for them, and a switch asked
        for later pays only for quantizing. Each step runs in a brief thread of its own while
        this one only waits, so no team outlives its work. A job (a question, a switch, a
        measurement) pauses the pass between lessons: it is the learner's wait.
        """
        from tutor.engine.loading import preload_bitsandbytes

        retriever = self.retriever
        assert retriever is not None
        try:
            if self.remote is None:
                threads.briefly(preload_bitsandbytes, "warm")
            retriever.index_rest(pause=self._idle.wait, run=lambda step: threads.briefly(step, "index"))
        except Exception as exc:
            self.index_error = f"{type(exc).__name__}: {exc}"

    def _load_model(self) -> Engine | RemoteEngine:
        from tutor.engine import Engine

        if self.remote is not None:
            self.stage, self.detail = "load", f"connecting to {self.remote}"
            return self.settings.connect()

        def progress(step: LoadProgress) -> None:
            # Conversion (first run only) and loading share the bar after the index's tenth.
            share, base = (0.6, 0.1) if step.stage == "convert" else (0.3, 0.7)
            self.stage, self.detail = step.stage, step.message
            self.fraction = base + share * step.fraction

        return Engine.load(
            self.model, device=self.device, progress=progress, cache_dir=self.cache_dir, threads=self.threads
        )

    @property
    def remote(self) -> str | None:
        """The server that generates the replies (None: the local model)."""
        return self.settings.url

    def precisions(self) -> tuple[str, ...]:
        """What the tutor can switch to: every precision here, or the variants the remote server
        serves (none until it answered)."""
        if self.remote is None:
            return tuple(PRECISIONS)
        return tuple(self.engine.variants) if isinstance(self.engine, RemoteEngine) else ()

    @property
    def model_name(self) -> str:
        if self.remote is not None:
            return "remote"
        if self.model is None:
            return MODEL_NAME
        return Path(str(self.model)).name.removesuffix(".gguf").lower() or MODEL_NAME

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "state": self.state,
            "stage": self.stage,
            "detail": self.detail,
            "fraction": round(self.fraction, 3),
            "error": self.error,
            "model": self.model_name,
            "device": self.device if self.remote is None else f"remote {self.remote}",
            "load_seconds": self.load_seconds,
            "job": self.job,
            # Lessons searched so far while the others are indexed in the background.
            "index": None
            if self.retriever is None
            else {**self.retriever.coverage(), "error": self.index_error},
        }
        engine = self.engine
        if self.state != READY or engine is None:
            return data
        data["precision"] = engine.precision
        if isinstance(engine, RemoteEngine):  # the server's memory is not reported to a client
            data.update(weights_mib=None, prepared=list(engine.variants), memory={})
        else:
            data.update(
                weights_mib=engine.weights().weights_mib,
                prepared=list(engine.prepared()),
                memory=engine.memory(),
            )
        return data

    def _ready(self) -> tuple[Engine | RemoteEngine, Retriever]:
        if self.state != READY or self.engine is None or self.retriever is None:
            raise NotReadyError(self.error or f"the model is {self.state}: {self.detail}".rstrip(": "))
        return self.engine, self.retriever

    # --- one job at a time -------------------------------------------------------------

    @contextlib.contextmanager
    def _job(self, what: str, cancel: threading.Event, emit: Emit | None = None) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            if emit is not None:
                emit("waiting", {"job": self.job})
            while not self._lock.acquire(timeout=0.1):
                if cancel.is_set():
                    raise Cancelled(f"cancelled while waiting for: {self.job}")
        self.job = what
        self._idle.clear()
        try:
            yield
        finally:
            self.job = ""
            self._idle.set()
            self._lock.release()

    @contextlib.contextmanager
    def tracked(self, request_id: str | None, cancel: threading.Event) -> Iterator[None]:
        """Make one request's cancel flag findable by its id (``/qt/cancel``) while it runs."""
        if request_id:
            self._cancels[request_id] = cancel
            if request_id in self._early:
                cancel.set()
        try:
            yield
        finally:
            if request_id:
                self._cancels.pop(request_id, None)

    def cancel(self, request_id: str) -> bool:
        """Stop that request; one not seen yet is stopped as soon as it arrives."""
        flag = self._cancels.get(request_id)
        if flag is None:
            self._early.append(request_id)
            return False
        flag.set()
        return True

    # --- jobs -------------------------------------------------------------------------

    def switch(self, precision: str) -> dict[str, Any]:
        engine, _ = self._ready()
        precision = check_precision(precision)
        with self._job(f"switching to {precision}", threading.Event()):
            report = engine.switch(precision, wait=True)
        return {**report.as_dict(), "describe": report.describe(), "weights_mib": report.weights_mib}

    def ask(
        self,
        question: str,
        lesson_id: str | None,
        precision: str | None,
        cancel: threading.Event,
        emit: Emit,
        *,
        max_sentences: int,
    ) -> TutorAnswer:
        from tutor.assistant.tutor_chat import ask

        engine, retriever = self._ready()
        precision = check_precision(precision or engine.precision)

        def prepared(p: PreparedAnswer) -> None:
            emit("prepared", prepared_dict(p))

        # Tokens go out together at most every TOKEN_PACE_S (the first at once): a message per
        # token woke this process's event loop and the app's reader 60 times a second, each
        # wake taking a core from the decode's two threads.
        pending: list[str] = []
        sent = 0.0

        def send() -> None:
            nonlocal sent
            if pending:
                emit("token", {"text": "".join(pending)})
                pending.clear()
                sent = time.monotonic()

        def token(event: TokenEvent) -> None:
            pending.append(event.text)
            if time.monotonic() - sent >= TOKEN_PACE_S:
                send()

        with self._job(f"answering at {precision}", cancel, emit):
            engine.switch(precision, wait=True)
            answer = ask(
                question,
                retriever,
                engine,
                lesson_id,
                on_token=token,
                cancel=cancel,
                on_prepared=prepared,
                max_sentences=max_sentences,
            )
            send()
            return answer

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        precision: str | None,
        *,
        max_tokens: int,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        cancel: threading.Event,
        on_token: Callable[[TokenEvent], None],
    ) -> Reply:
        engine, _ = self._ready()
        precision = check_precision(precision or engine.precision)
        sample = bool(temperature)
        with self._job(f"a chat completion at {precision}", cancel):
            engine.switch(precision, wait=True)
            return engine.generate(
                list(messages),
                max_new_tokens=max_tokens,
                on_token=on_token,
                cancel=cancel,
                sample=sample,
                temperature=temperature or 1.0,
                top_p=1.0 if top_p is None else top_p,
                seed=seed,
                wait=True,
            )

    def score_prompt(
        self, text: str, precision: str | None, top: int, cancel: threading.Event
    ) -> dict[str, Any]:
        """The log-probability of each token of ``text`` given the ones before it, and the ``top``
        likeliest tokens at each place: what an OpenAI completion with ``echo`` and ``logprobs``
        returns (the first token has none). Text pieces name the tokens, as OpenAI's do."""
        engine, _ = self._ready()
        if isinstance(engine, RemoteEngine):
            raise EngineError(
                f"Prompt log-probabilities come from the local engine; {self.remote} generates here."
            )
        precision = check_precision(precision or engine.precision)
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not 2 <= len(ids) <= engine.max_positions:
            raise ValueError(f"the prompt must be 2 to {engine.max_positions} tokens; it is {len(ids)}")
        with self._job(f"scoring a prompt at {precision}", cancel):
            engine.switch(precision, wait=True)
            logprobs = engine.window_logprobs([ids], batch_size=1)[0, :-1]
        return prompt_logprobs_dict(ids, logprobs, top, engine.tokenizer.decode)

    def cliff(
        self, plan: str, precisions: Sequence[str], cancel: threading.Event, emit: Emit
    ) -> dict[str, Any]:
        from tutor.lab.cliff import PLANS, run_cliff

        engine, retriever = self._ready()
        if isinstance(engine, RemoteEngine):
            raise EngineError(LAB_NEEDS_LOCAL.format(url=self.remote))
        if plan not in PLANS:
            raise ValueError(f"unknown plan {plan!r}; use one of {', '.join(PLANS)}")
        wanted = [check_precision(p) for p in precisions]
        with self._job(f"the Lab's {plan} measurement", cancel, emit):
            result = run_cliff(  # leaves the engine at the precision it had
                engine,
                self.library,
                wanted,
                retriever=retriever,
                plan=PLANS[plan],
                progress=lambda phase, done, total: emit(
                    "progress", {"phase": phase, "done": done, "total": total}
                ),
                on_row=lambda row: emit("row", row.as_dict()),
                on_section=lambda section: emit("section", section.as_dict()),
                cancel=cancel,
            )
        return result.as_dict()
