"""The Engine: one loaded model, its tokenizer, its current precision, and its reply loop.

The work itself lives beside it: loading in ``loading``, switching in ``switching``, prompts in
``prompts``, the token loop in ``generate`` and ``sessions``, the lab's window reads in
``scoring`` and ``probes``, gptq4's calibration in ``calibration`` (``engine.gptq``). The Engine
holds the state they share and the lock (``lock``) that keeps a reply, a switch and a
measurement from running into each other.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from tutor.engine import prompts, switching
from tutor.engine.checkpoint import Checkpoint
from tutor.engine.errors import EngineError
from tutor.engine.generate import (
    Cancel,
    Messages,
    OnToken,
    ReplyOptions,
    ReplyStream,
    RunContext,
    Sampling,
    Session,
    run_tokens,
)
from tutor.engine.loading import build_engine
from tutor.engine.lock import EngineLock
from tutor.engine.precisions import PRECISIONS, check_precision
from tutor.engine.reports import (
    PrepareReport,
    Reply,
    SwitchReport,
    TokenEvent,
    WeightsReport,
)

if TYPE_CHECKING:
    import torch

    from tutor.engine.decoder import FastDecoder, Residuals
    from tutor.engine.decoder_weights import DecoderWeights
    from tutor.engine.linears import See
    from tutor.engine.precision_manager import PrecisionManager


class Engine:
    """A loaded model you can switch between precisions and chat with. See ``tutor.engine``."""

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        checkpoint: Checkpoint,
        device: torch.device,
        manager: PrecisionManager,
        decoder: FastDecoder | None,
        load_seconds: float,
        cache_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.torch_device = device
        self._manager = manager
        self._decoder = decoder
        self.load_seconds = load_seconds
        self._busy = EngineLock()
        config = model.config
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048))
        self.stop_ids = prompts.stop_ids(model, tokenizer)
        from tutor.engine.calibration import GptqCodes

        # gptq4's codes (the manager asks it for them when it builds gptq4) and its calibration
        self.gptq = GptqCodes(cache_dir, str(checkpoint.path), tokenizer, decoder, manager, self._busy)

    # ------------------------------------------------------------------ loading

    # Engine.load(model=None, *, device="cpu", precision="bf16", ...): loading.build_engine reads
    # the model and builds this class around it (its docstring has the options).
    load = classmethod(build_engine)

    # ------------------------------------------------------------------ state

    @property
    def precision(self) -> str:
        return self._manager.active

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay recorded CUDA graphs (``tutor.engine.graphs``): by default
        on CUDA with the fast decoder; set False to decode eagerly (a benchmark's contrast)."""
        return self._decoder is not None and self._decoder.graphs

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        if self._decoder is not None:
            self._decoder.graphs = on and self.torch_device.type == "cuda"

    @property
    def native_step(self) -> bool:
        """Whether decode steps run as one native call each (``tutor.engine.native_step``): by
        default on a CPU where it could be built; set False for the Python loop (a benchmark's
        contrast)."""
        return self._decoder is not None and self._decoder.native_on

    @native_step.setter
    def native_step(self, on: bool) -> None:
        if self._decoder is not None:
            self._decoder.use_native = on

    @property
    def decoder_kind(self) -> str:
        return "fast" if self._decoder is not None else "generic"

    @property
    def arithmetic(self) -> str:
        """Names the kernels a prompt is read and a reply decoded with, for caches of what the
        model computed (the Lab's): a measurement taken with other kernels is taken again."""
        from tutor.engine.decoder import ARITHMETIC_VERSION

        if self._decoder is None:
            return "generic"
        native = self._decoder.native_prompt(self._current_weights().act_dtype)
        return f"{ARITHMETIC_VERSION}:{'native' if native else 'sdpa'}"

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    @property
    def int8_threshold(self) -> float:
        return self._manager.int8_threshold

    def prepared(self) -> tuple[str, ...]:
        return self._manager.prepared()

    def is_prepared(self, precision: str) -> bool:
        return self._manager.is_prepared(precision)

    def weights(self, precision: str | None = None) -> WeightsReport:
        """What the weights are made of at ``precision`` (default: the current one; must be prepared)."""
        return self._manager.weights_report(precision)

    def memory(self) -> dict[str, float | None]:
        """Measured memory now, in MiB."""
        from tutor.engine.memory import memory_mib

        return memory_mib(self._manager, self.torch_device)

    def _current_weights(self) -> DecoderWeights:
        """The fast decoder's view of the current precision (only where there is a fast decoder)."""
        weights = self._manager.current().weights
        assert weights is not None  # the fast decoder builds its view of every precision
        return weights

    # ------------------------------------------------------------------ switching

    def switch(self, precision: str, *, wait: bool | float = False) -> SwitchReport:
        """Run at ``precision`` from now on; returns what it took and what it holds.

        While a reply is generating this raises EngineBusyError, or with ``wait=True`` (or a
        timeout in seconds) waits for it. On failure it raises SwitchError and the engine keeps
        its previous precision, working.
        """
        precision = check_precision(precision)
        with self._busy.held(wait):
            return switching.switch_to(self._manager, precision)

    def prepare(self, precision: str, *, exclusive: bool = True, wait: bool | float = True) -> PrepareReport:
        """Build ``precision`` ahead so a later switch to it is a reference swap.

        Meant for a background thread. By default it holds the engine like a reply does
        (waiting for a running reply first, per ``wait``), because on a small CPU a build
        competing with a reply for cores slows that reply many times over; with
        ``exclusive=False`` it builds alongside (it only reads the masters, so it is safe).
        Raises SwitchError if building fails, EngineBusyError if ``wait`` runs out.
        """
        started = time.perf_counter()
        with self._busy.held(wait) if exclusive else contextlib.nullcontext():
            return switching.prepare(self._manager, precision, started)

    @contextlib.contextmanager
    def at(self, precision: str) -> Iterator[SwitchReport]:
        """Run the block at ``precision``, then put back the precision the engine had, even when
        the block switched again or failed (waiting for a reply in flight, as ``switch`` does)."""
        previous = self.precision
        report = self.switch(precision, wait=True)
        try:
            yield report
        finally:
            with contextlib.suppress(EngineError):
                self.switch(previous, wait=True)

    def pinned(self, precisions: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        """Keep ``precisions`` prepared inside, over the memory bound if need be (a mixed
        precision reads layers of several at once; were the bound to drop one, each read would
        rebuild it)."""
        return switching.pinned(self._manager, precisions)

    def lean(self) -> contextlib.AbstractContextManager[None]:
        """Hold as few precisions as the work inside allows: each switch drops every prepared
        precision but the one installed and any pinned (a long measurement visits each precision
        once; holding them all took the Lab's full plan past 3 GB). The bf16 masters stay: a
        switch back to bf16 only packs them again."""
        return switching.lean(self._manager)

    def drop_prepared(self, precision: str) -> bool:
        """Forget a prepared precision (never the current one); the next switch rebuilds it."""
        return self._manager.drop(precision)

    def release_prepared(self) -> None:
        """Forget every prepared precision but the current one and hand the freed memory back
        to the OS (between the phases of a long measurement)."""
        from tutor.engine.memory import give_back_freed

        for precision in self.prepared():
            if precision != self.precision:
                self.drop_prepared(precision)
        give_back_freed()

    # ------------------------------------------------------------------ replies

    def encode(
        self, messages: Messages, *, system: str | None = None, raw: bool = False, prefix: str = ""
    ) -> list[int]:
        """Token ids for a chat (``messages``: a user message string or role/content dicts).

        ``raw=True`` encodes a string as plain text with no chat template (continuation).
        ``prefix`` opens the assistant's turn: the model continues after it."""
        return prompts.encode(self.tokenizer, messages, system=system, raw=raw, prefix=prefix)

    def _session(self, max_len: int, contrast: tuple[list[int], float] | None = None) -> Session:
        """A decoding session; with ``contrast`` (the prompt without the passages, alpha), one
        that decodes context-aware (``tutor.engine.sessions.mix_contrast``)."""
        from tutor.engine.sessions import open_session

        weights = self._current_weights() if self._decoder is not None else None
        return open_session(self.model, self._decoder, weights, self.torch_device, max_len, contrast)

    def _reply(
        self,
        messages: Messages | None,
        cancel: Cancel,
        *,
        prompt_ids: Sequence[int] | None = None,
        max_new_tokens: int = 256,
        sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 0,
        seed: int | None = None,
        system: str | None = None,
        raw: bool = False,
        wait: bool | float = False,
        contrast: Messages | None = None,
        alpha: float = 0.0,
        prefix: str = "",
    ) -> Generator[TokenEvent, None, Reply]:
        """The reply's events, the engine held from the first to the last (``ReplyOptions``)."""
        started = time.perf_counter()
        with self._busy.held(wait):
            if prompt_ids is None:
                if messages is None:
                    raise TypeError("give messages or prompt_ids")
                prompt_ids = self.encode(messages, system=system, raw=raw, prefix=prefix)
            ids = [int(t) for t in prompt_ids]
            budget = prompts.reply_budget(ids, self.max_positions, max_new_tokens)
            plain = None
            if contrast is not None and alpha > 0:
                plain = (self.encode(contrast, system=system, raw=raw, prefix=prefix), float(alpha))
            context = RunContext(
                session=self._session(len(ids) + max(budget, 1), plain),
                precision=self.precision,
                device=self.device,
                weights_mib=self.weights().weights_mib,
                cuda=self.torch_device.type == "cuda",
            )
            reply = yield from run_tokens(
                context,
                ids,
                tokenizer=self.tokenizer,
                stop_ids=self.stop_ids,
                max_new_tokens=budget,
                sampling=Sampling(sample, temperature, top_p, top_k, seed),
                cancel=cancel,
                started=started,
            )
        return reply

    def generate(
        self,
        messages: Messages | None = None,
        *,
        on_token: OnToken = None,
        cancel: Cancel = None,
        **options: Unpack[ReplyOptions],
    ) -> Reply:
        """Generate a reply to ``messages`` (or to ready ``prompt_ids``), calling ``on_token`` per token.

        Greedy by default; ``sample=True`` samples (``temperature``, ``top_p``, ``top_k``; seeded
        by ``seed``). ``max_new_tokens`` (256) caps the reply; ``system`` and ``raw`` are as in
        ``encode``. ``cancel`` (an Event or a callable) stops the reply before the next token.
        Raises EngineBusyError if another reply or a switch holds the engine (``wait=True``
        waits instead). ``contrast`` (the same conversation without its context) and ``alpha``
        > 0 decode context-aware: each token's logits are ``(1 + alpha) * with - alpha *
        without``, both computed in one batch. ``prefix`` opens the reply (in both prompts);
        the reply is what the model adds after it.
        """
        events = self._reply(messages, cancel, **options)
        while True:
            try:
                event = next(events)
            except StopIteration as done:
                return done.value
            if on_token is not None:
                on_token(event)

    def stream(
        self,
        messages: Messages | None = None,
        *,
        cancel: threading.Event | None = None,
        **options: Unpack[ReplyOptions],
    ) -> ReplyStream:
        """Like ``generate`` but as an iterator of TokenEvents (``.reply`` once exhausted)."""
        event = cancel or threading.Event()
        return ReplyStream(self._reply(messages, event, **options), event)

    # ------------------------------------------------------------------ the lab's reads

    def window_logits(
        self,
        windows: Sequence[Sequence[int]] | torch.Tensor,
        *,
        start: int = 0,
        batch_size: int = 4,
        wait: bool | float = True,
        mix: Sequence[str] | None = None,
        residuals: Residuals | None = None,
        as_computed: bool = False,
    ) -> torch.Tensor:
        """Next-token logits at the current precision, float32 on the CPU (``as_computed``: in
        the dtype the precision computes in, not to be changed in place).

        ``windows`` is a batch of equal-length token windows ``(B, T)``; the result is
        ``(B, T - start, vocab)`` where row ``t`` predicts token ``start + t + 1``. Each window is
        read from scratch (no KV cache), in micro-batches of ``batch_size``. ``mix`` (one
        precision per decoder layer, computing in one dtype) reads them with each layer at its
        own precision instead: mixed precision, on the fast decoder. ``residuals`` (one pass
        over every window) records the stream entering each layer, or starts at a later layer
        from one recorded (``FastDecoder.forward``): a mix whose first layers are the recording
        pass's computes only the rest.
        """
        from tutor.engine import scoring
        from tutor.engine.memory import give_back_freed_when_grown

        mixed = scoring.mixed_weights(self._decoder, self._manager, mix) if mix is not None else None
        ids = scoring.window_ids(windows, start, self.max_positions)
        with self._busy.held(wait):
            give_back_freed_when_grown()  # what the last reads freed, before this one adds to it
            weights = mixed or (self._current_weights() if self._decoder is not None else None)
            return scoring.window_logits(
                self.model,
                self._decoder,
                weights,
                ids,
                start=start,
                batch_size=batch_size,
                device=self.torch_device,
                residuals=residuals,
                as_computed=as_computed,
            )

    def window_logprobs(
        self, windows: Sequence[Sequence[int]] | torch.Tensor, *, start: int = 0, batch_size: int = 4
    ) -> torch.Tensor:
        """``log_softmax`` of ``window_logits`` (float32, CPU)."""
        return self.window_logits(windows, start=start, batch_size=batch_size).log_softmax(-1)

    def linear_inputs(self, windows: Sequence[Sequence[int]], see: See) -> None:
        """Read ``windows`` (one batch) at the reference precision, showing each decoder Linear's
        input to ``see(names, x)``: ``x`` is ``(rows, in_features)``, ``names`` the Linear modules
        that read it (one, or a group the fast decoder computes as one). ``see`` may raise to end
        the pass; the exception reaches the caller."""
        import torch

        from tutor.engine.probes import show_linear_inputs

        ids = torch.tensor([list(w) for w in windows], dtype=torch.long, device=self.torch_device)
        with self._busy.held(True):
            show_linear_inputs(self.model, self._decoder, self._manager, ids, see)

    def prefill_footprint(self, ids: Sequence[int]) -> tuple[int, int]:
        """Read ``ids`` into a fresh KV buffer at the current precision, as a reply's prompt is
        read; returns (the buffer's bytes, the peak of torch's allocations during the read above
        what was allocated before: activations and scratch). On a CPU that peak comes from the
        profiler's record of every allocation and free (``profile_memory``), on CUDA from the
        caching allocator's own statistics."""
        from tutor.engine.probes import prefill_footprint

        if self._decoder is None:
            raise EngineError(
                "Measuring a prefill's memory needs the fast decoder (a Llama-architecture model)."
            )
        with self._busy.held(True):
            return prefill_footprint(self._decoder, self._current_weights(), ids)

    def continue_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of ``prompts`` at the current precision, each cut before its first
        stop token. Prompts of one length decode as one batch on the fast decoder (a step for four
        costs little more than for one on a CPU); others one by one, as ``generate`` does."""
        from tutor.engine.scoring import greedy_batch

        if self._decoder is None or len({len(p) for p in prompts}) != 1:
            return [
                self.generate(prompt_ids=p, max_new_tokens=max_new_tokens, wait=True).tokens for p in prompts
            ]
        with self._busy.held(True):
            return greedy_batch(
                self._decoder, self._current_weights(), prompts, max_new_tokens, self.stop_ids
            )

    def close(self) -> None:
        """Drop prepared precisions and references so the memory can be reclaimed."""
        with self._busy.held(True):
            for name in list(self._manager.prepared()):
                self._manager.drop(name)


load_engine = Engine.load

__all__ = ["PRECISIONS", "Engine", "ReplyStream", "load_engine"]
