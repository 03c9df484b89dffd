"""The Engine: one loaded model, its tokenizer, its current precision, and its reply loop."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine.checkpoint import Checkpoint, discard, resolve_checkpoint
from tutor.engine.errors import (
    EngineBusyError,
    EngineError,
    ModelLoadError,
    PromptTooLongError,
    SwitchError,
    reason,
)
from tutor.engine.generate import (
    Cancel,
    Messages,
    OnToken,
    ReplyStream,
    RunContext,
    Sampling,
    Session,
    run_tokens,
)
from tutor.engine.loading import check_device, default_limit_bytes, load_pretrained
from tutor.engine.precisions import DEFAULT_PRECISION, PRECISIONS, check_precision
from tutor.engine.reports import (
    LoadProgress,
    PrepareReport,
    ProgressCallback,
    Reply,
    SwitchReport,
    TokenEvent,
    WeightsReport,
)

if TYPE_CHECKING:
    import torch

    from tutor.engine.calibration import Calibration
    from tutor.engine.decoder import DecoderWeights, FastDecoder
    from tutor.engine.int4 import Codes
    from tutor.engine.linears import See
    from tutor.engine.precision import PrecisionManager

BUSY_MESSAGE = "A reply is being generated; wait for it to finish or cancel it, then try again."


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
        self.cache_dir = cache_dir
        self.calibration: Calibration | None = None  # gptq4's, once calibrated or read from the cache
        self._busy = threading.Lock()
        config = model.config
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048))
        self.stop_ids = self._stop_ids()
        if decoder is not None:
            manager.calibrated = self._gptq_codes

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        precision: str = DEFAULT_PRECISION,
        progress: ProgressCallback | None = None,
        cache_dir: Path | None = None,
        int8_threshold: float = 6.0,
        double_quant: bool = False,
        prepared_limit_bytes: int | None = None,
        fast: bool = True,
        workers: int | None = None,
        random_weights: bool = False,
        threads: int | None = None,
    ) -> Engine:
        """Load ``model`` (None: the embedded SmolLM2-135M-Instruct) on ``device`` at ``precision``.

        Converts the embedded GGUF on first use (``progress`` gets LoadProgress events). Raises
        ModelNotFoundError, ModelLoadError, DeviceError or UnsupportedPrecisionError.
        ``fast=False`` uses the generic transformers decode loop; ``random_weights=True`` builds
        the architecture from the checkpoint's config with random weights (benchmarks only);
        ``workers`` threads build quantized modules (default: up to 2). ``threads`` sets torch's
        intra-op threads for the whole process (default: torch's choice, one per core); on a
        small machine that is also drawing a UI, ``cores - 1`` avoids stalls (see bench notes).
        """
        precision = check_precision(precision)
        torch_device = check_device(device)
        if threads is not None:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        started = time.perf_counter()
        checkpoint = resolve_checkpoint(model, cache_dir=cache_dir, progress=progress)
        try:
            hf_model, tokenizer = load_pretrained(checkpoint, torch_device, progress, random_weights)
        except ModelLoadError:
            if not checkpoint.derived or checkpoint.converted_now:
                raise
            discard(checkpoint)  # a damaged cache: rebuild it once from the GGUF file
            checkpoint = resolve_checkpoint(model, cache_dir=cache_dir, progress=progress)
            hf_model, tokenizer = load_pretrained(checkpoint, torch_device, progress, random_weights)
        engine = cls._assemble(
            hf_model,
            tokenizer,
            checkpoint,
            torch_device,
            int8_threshold=int8_threshold,
            double_quant=double_quant,
            prepared_limit_bytes=prepared_limit_bytes,
            fast=fast,
            workers=workers,
            progress=progress,
            started=started,
            cache_dir=cache_dir,
        )
        if precision != DEFAULT_PRECISION:
            engine.switch(precision)
        engine.load_seconds = time.perf_counter() - started
        return engine

    @classmethod
    def _assemble(
        cls,
        hf_model: Any,
        tokenizer: Any,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        int8_threshold: float,
        double_quant: bool,
        prepared_limit_bytes: int | None,
        fast: bool,
        workers: int | None,
        progress: ProgressCallback | None,
        started: float,
        cache_dir: Path | None,
    ) -> Engine:
        from tutor.engine.decoder import FastDecoder, fast_path_problem
        from tutor.engine.memory import cpu_count
        from tutor.engine.precision import PrecisionManager

        if progress is not None:
            progress(LoadProgress("load", 2, 3, "preparing the bf16 weights"))
        decoder = FastDecoder(hf_model, device) if fast and fast_path_problem(hf_model) is None else None
        master_bytes = sum(
            m.weight.numel() * m.weight.element_size()
            for m in hf_model.modules()
            if type(m).__name__ == "Linear" and m is not hf_model.get_output_embeddings()
        )
        limit = (
            prepared_limit_bytes
            if prepared_limit_bytes is not None
            else default_limit_bytes(master_bytes, device)
        )
        try:
            manager = PrecisionManager(
                hf_model,
                decoder=decoder,
                device=device,
                limit_bytes=limit,
                int8_threshold=int8_threshold,
                double_quant=double_quant,
                workers=workers if workers is not None else min(2, cpu_count()),
            )
        except SwitchError as exc:
            raise ModelLoadError(str(exc)) from exc
        if progress is not None:
            progress(LoadProgress("load", 3, 3, "ready"))
        return cls(
            model=hf_model,
            tokenizer=tokenizer,
            checkpoint=checkpoint,
            device=device,
            manager=manager,
            decoder=decoder,
            load_seconds=time.perf_counter() - started,
            cache_dir=cache_dir,
        )

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    # ------------------------------------------------------------------ state

    @property
    def precision(self) -> str:
        return self._manager.active

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def decoder_kind(self) -> str:
        return "fast" if self._decoder is not None else "generic"

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    @property
    def int8_threshold(self) -> float:
        return self._manager.int8_threshold

    @property
    def prepared_limit_bytes(self) -> int:
        return self._manager.limit_bytes

    def prepared(self) -> tuple[str, ...]:
        return self._manager.prepared()

    def is_prepared(self, precision: str) -> bool:
        return self._manager.is_prepared(precision)

    def weights(self, precision: str | None = None) -> WeightsReport:
        """What the weights are made of at ``precision`` (default: the current one; must be prepared)."""
        return self._manager.weights_report(precision)

    def memory(self) -> dict[str, float | None]:
        """Measured memory now, in MiB."""
        import torch

        from tutor.engine.memory import peak_rss_bytes, rss_bytes
        from tutor.engine.reports import mib

        cuda = self.torch_device.type == "cuda"
        return {
            "weights_mib": self.weights().weights_mib,
            "master_mib": mib(self._manager.master_bytes),
            "prepared_mib": mib(self._manager.prepared_bytes()),
            "prepared_limit_mib": mib(self._manager.limit_bytes),
            "rss_mib": mib(rss_bytes()),
            "peak_rss_mib": mib(peak_rss_bytes()),
            "cuda_allocated_mib": mib(torch.cuda.memory_allocated(self.torch_device)) if cuda else None,
        }

    # ------------------------------------------------------------------ switching

    @contextlib.contextmanager
    def _exclusive(self, wait: bool | float) -> Iterator[None]:
        if wait is True:
            acquired = self._busy.acquire()
        elif wait is False:
            acquired = self._busy.acquire(blocking=False)
        else:
            acquired = self._busy.acquire(timeout=float(wait))
        if not acquired:
            raise EngineBusyError(BUSY_MESSAGE)
        try:
            yield
        finally:
            self._busy.release()

    def switch(self, precision: str, *, wait: bool | float = False) -> SwitchReport:
        """Run at ``precision`` from now on; returns what it took and what it holds.

        While a reply is generating this raises EngineBusyError, or with ``wait=True`` (or a
        timeout in seconds) waits for it. On failure it raises SwitchError and the engine keeps
        its previous precision, working.
        """
        precision = check_precision(precision)
        with self._exclusive(wait):
            return self._switch_locked(precision)

    def _switch_locked(self, precision: str) -> SwitchReport:
        manager = self._manager
        previous = manager.active
        started = time.perf_counter()
        if precision == previous:
            prepared, from_cache = manager.current(), True
        else:
            prepared, from_cache = manager.prepare(precision)
            try:
                manager.install(prepared)
            except Exception as exc:
                raise SwitchError(
                    f"Could not switch to {precision} ({reason(exc)}); still running at {previous}.",
                    precision=precision,
                    kept=previous,
                ) from exc
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

    def prepare(self, precision: str, *, exclusive: bool = True, wait: bool | float = True) -> PrepareReport:
        """Build ``precision`` ahead so a later switch to it is a reference swap.

        Meant for a background thread. By default it holds the engine like a reply does
        (waiting for a running reply first, per ``wait``), because on a small CPU a build
        competing with a reply for cores slows that reply many times over; with
        ``exclusive=False`` it builds alongside (it only reads the masters, so it is safe).
        Raises SwitchError if building fails, EngineBusyError if ``wait`` runs out.
        """
        started = time.perf_counter()
        if exclusive:
            with self._exclusive(wait):
                prepared, held = self._manager.prepare(precision)
        else:
            prepared, held = self._manager.prepare(precision)
        return PrepareReport(
            precision=prepared.precision,
            seconds=round(time.perf_counter() - started, 4),
            from_cache=held,
            prepared_bytes=self._manager.prepared_bytes(),
        )

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

    @contextlib.contextmanager
    def pinned(self, precisions: Iterable[str]) -> Iterator[None]:
        """Keep ``precisions`` prepared inside, over the memory bound if need be.

        A measurement switches among its precisions once per batch of windows; were the bound
        to drop one, each batch would rebuild it.
        """
        manager = self._manager
        before = manager.pinned
        manager.pinned = before | {check_precision(p) for p in precisions}
        try:
            yield
        finally:
            manager.pinned = before

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

    # ------------------------------------------------------------------ prompts

    def encode(
        self, messages: Messages, *, system: str | None = None, raw: bool = False, prefix: str = ""
    ) -> list[int]:
        """Token ids for a chat (``messages``: a user message string or role/content dicts).

        ``raw=True`` encodes a string as plain text with no chat template (continuation).
        ``prefix`` opens the assistant's turn: the model continues after it."""
        if prefix:
            start = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            return self.encode(messages, system=system, raw=raw) + [int(t) for t in start]
        if raw:
            if not isinstance(messages, str):
                raise TypeError("raw=True takes a string")
            return list(self.tokenizer(messages)["input_ids"])
        chat: list[Mapping[str, str]] = (
            [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        )
        if system is not None:
            chat = [{"role": "system", "content": system}, *chat]
        encoded = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
            encoded = encoded["input_ids"]
        return [int(t) for t in encoded]

    def _session(self, max_len: int, contrast: tuple[list[int], float] | None = None) -> Session:
        """A decoding session; with ``contrast`` (the prompt without the passages, alpha), one
        that decodes context-aware (``tutor.engine.sessions.mix_contrast``)."""
        from tutor.engine.sessions import (
            FastContrastSession,
            FastSession,
            GenericSession,
            PairContrastSession,
        )

        if self._decoder is not None:
            weights = self._manager.current().weights
            assert weights is not None
            if contrast is not None:
                return FastContrastSession(self._decoder, weights, max_len, *contrast)
            return FastSession(self._decoder, weights, max_len)
        static = self.torch_device.type == "cuda"
        if contrast is not None:
            plain_ids, alpha = contrast
            return PairContrastSession(
                GenericSession(self.model, self.torch_device, max_len, static=static),
                GenericSession(self.model, self.torch_device, len(plain_ids) + max_len, static=static),
                plain_ids,
                alpha,
            )
        return GenericSession(self.model, self.torch_device, max_len, static=static)

    # ------------------------------------------------------------------ generating

    def _run(
        self,
        messages: Messages | None,
        *,
        prompt_ids: Sequence[int] | None,
        max_new_tokens: int,
        cancel: Cancel,
        sampling: Sampling,
        system: str | None,
        raw: bool,
        wait: bool | float,
        contrast: Messages | None = None,
        alpha: float = 0.0,
        prefix: str = "",
    ) -> Generator[TokenEvent, None, Reply]:
        started = time.perf_counter()
        with self._exclusive(wait):
            if prompt_ids is None:
                if messages is None:
                    raise TypeError("give messages or prompt_ids")
                prompt_ids = self.encode(messages, system=system, raw=raw, prefix=prefix)
            ids = [int(t) for t in prompt_ids]
            if not ids:
                raise PromptTooLongError("The prompt is empty.")
            room = self.max_positions - len(ids)
            if room < 1:
                raise PromptTooLongError(
                    f"The prompt has {len(ids)} tokens; this model reads at most {self.max_positions}."
                )
            budget = max(0, min(int(max_new_tokens), room))
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
                sampling=sampling,
                cancel=cancel,
                started=started,
            )
        return reply

    def generate(
        self,
        messages: Messages | None = None,
        *,
        prompt_ids: Sequence[int] | None = None,
        max_new_tokens: int = 256,
        on_token: OnToken = None,
        cancel: Cancel = None,
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
    ) -> Reply:
        """Generate a reply to ``messages`` (or to ready ``prompt_ids``), calling ``on_token`` per token.

        Greedy by default; ``sample=True`` samples (seeded by ``seed``). ``cancel`` (an Event or a
        callable) stops the reply before the next token. Raises EngineBusyError if another reply
        or a switch holds the engine (``wait=True`` waits instead). ``contrast`` (the same
        conversation without its context) and ``alpha`` > 0 decode context-aware: each token's
        logits are ``(1 + alpha) * with - alpha * without``, both computed in one batch.
        ``prefix`` opens the reply (in both prompts); the reply is what the model adds after it.
        """
        sampling = Sampling(sample, temperature, top_p, top_k, seed)
        events = self._run(
            messages,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            cancel=cancel,
            sampling=sampling,
            system=system,
            raw=raw,
            wait=wait,
            contrast=contrast,
            alpha=alpha,
            prefix=prefix,
        )
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
        prompt_ids: Sequence[int] | None = None,
        max_new_tokens: int = 256,
        cancel: threading.Event | None = None,
        sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 0,
        seed: int | None = None,
        system: str | None = None,
        raw: bool = False,
        wait: bool | float = False,
    ) -> ReplyStream:
        """Like ``generate`` but as an iterator of TokenEvents (``.reply`` once exhausted)."""
        event = cancel or threading.Event()
        sampling = Sampling(sample, temperature, top_p, top_k, seed)
        events = self._run(
            messages,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            cancel=event,
            sampling=sampling,
            system=system,
            raw=raw,
            wait=wait,
        )
        return ReplyStream(events, event)

    # ------------------------------------------------------------------ scoring

    def window_logits(
        self,
        windows: Sequence[Sequence[int]] | torch.Tensor,
        *,
        start: int = 0,
        batch_size: int = 4,
        wait: bool | float = True,
        mix: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Next-token logits at the current precision, float32 on the CPU.

        ``windows`` is a batch of equal-length token windows ``(B, T)``; the result is
        ``(B, T - start, vocab)`` where row ``t`` predicts token ``start + t + 1``. Each window is
        read from scratch (no KV cache), in micro-batches of ``batch_size``. ``mix`` (one
        precision per decoder layer, computing in one dtype) reads them with each layer at its
        own precision instead: mixed precision, on the fast decoder.
        """
        import torch

        mixed = self._mixed_weights(mix) if mix is not None else None

        ids = windows if isinstance(windows, torch.Tensor) else torch.tensor([list(w) for w in windows])
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError("windows must be a (batch, length) batch of token ids")
        if not 0 <= start < ids.shape[1]:
            raise ValueError(f"start must be in [0, {ids.shape[1]}), got {start}")
        if ids.shape[1] > self.max_positions:
            raise PromptTooLongError(f"Windows of {ids.shape[1]} tokens exceed {self.max_positions}.")
        outputs: list[torch.Tensor] = []
        with self._exclusive(wait), torch.inference_mode():
            for first in range(0, ids.shape[0], max(1, batch_size)):
                chunk = ids[first : first + batch_size].to(self.torch_device, dtype=torch.long)
                if self._decoder is not None:
                    weights = mixed or self._manager.current().weights
                    assert weights is not None
                    logits = self._decoder.forward(weights, chunk, None, last_only=False, keep_from=start)
                else:
                    logits = self.model(input_ids=chunk, use_cache=False).logits[:, start:]
                outputs.append(logits.float().cpu())
        return torch.cat(outputs)

    def linear_inputs(self, windows: Sequence[Sequence[int]], see: See) -> None:
        """Read ``windows`` (one batch) at the reference precision, showing each decoder Linear's
        input to ``see(names, x)``: ``x`` is ``(rows, in_features)``, ``names`` the Linear modules
        that read it (one, or a group the fast decoder computes as one). ``see`` may raise to end
        the pass; the exception reaches the caller."""
        import torch

        ids = torch.tensor([list(w) for w in windows], dtype=torch.long, device=self.torch_device)
        with self._exclusive(True), torch.inference_mode():
            if self._decoder is not None:
                weights = self._manager.reference_weights()
                self._decoder.forward(self._decoder.tapped(weights, see), ids, None)
                return
            if self._manager.active != DEFAULT_PRECISION:
                raise EngineError(f"Switch to {DEFAULT_PRECISION} first: the model holds {self.precision}.")
            hooks = [
                module.register_forward_pre_hook(
                    lambda m, inputs, name=name: see((name,), inputs[0].reshape(-1, m.in_features))
                )
                for name, module in self._manager.masters.items()
            ]
            try:
                self.model(input_ids=ids, use_cache=False)
            finally:
                for hook in hooks:
                    hook.remove()

    def _gptq_cache(self, text: str) -> Path:
        from tutor.engine import calibration
        from tutor.paths import cache_dir

        return calibration.cache_path(self.cache_dir or cache_dir(), str(self.checkpoint.path), text)

    def gptq_calibration(self) -> Calibration | None:
        """What gptq4 was calibrated on and how long that took: this run's, or the cached codes'."""
        from tutor.engine import calibration

        if self.calibration is not None:
            return self.calibration
        return calibration.read_report(self._gptq_cache(calibration.calibration_text()))

    def calibrate_gptq(self, step: Callable[[int, int], None] | None = None) -> Calibration:
        """Calibrate gptq4 now unless its codes are cached (``step(done, total)`` as it goes; it
        may raise to stop, and nothing is cached then), so a later switch only reads them."""
        if self._decoder is None:
            raise EngineError("gptq4 calibrates on the fast decoder, which this model does not run on.")
        with self._exclusive(True):
            self._gptq_codes(step)
        assert self.calibration is not None
        return self.calibration

    def _gptq_codes(self, step: Callable[[int, int], None] | None = None) -> Mapping[tuple[str, ...], Codes]:
        """gptq4's codes: from the cache, or calibrated now (on the caller's thread, inside a
        build: no engine lock is taken here) and cached."""
        from tutor.engine import calibration

        text = calibration.calibration_text()
        path = self._gptq_cache(text)
        cached = calibration.load(path)
        if cached is not None:
            codes, self.calibration = cached
            return codes
        assert self._decoder is not None
        windows = calibration.calibration_windows(self.tokenizer, text)
        weights, masters = self._manager.reference_weights(), self._manager.masters
        codes, self.calibration = calibration.calibrate(self._decoder, weights, masters, windows, step)
        calibration.save(path, codes, self.calibration)
        return codes

    def _mixed_weights(self, mix: Sequence[str]) -> DecoderWeights:
        """The fast decoder's weights with layer ``i`` taken from precision ``mix[i]``'s (each
        built now if it is not held; all of them kept while held here)."""
        from dataclasses import replace

        if self._decoder is None or len(mix) != self._decoder.n_layers:
            raise EngineError("A mix needs the fast decoder and one precision for each of its layers.")
        names = [check_precision(p) for p in mix]
        held: dict[str, DecoderWeights] = {}
        for name in dict.fromkeys(names):
            weights = self._manager.prepare(name)[0].weights
            assert weights is not None  # the fast decoder builds its view of every precision
            held[name] = weights
        if len({w.act_dtype for w in held.values()}) != 1:
            raise EngineError("A mix needs precisions that compute in one dtype (bf16, int8, nf4, fp4).")
        layers = [held[name].layers[i] for i, name in enumerate(names)]
        return replace(next(iter(held.values())), precision="mixed", layers=layers, copies=[])

    def window_logprobs(
        self, windows: Sequence[Sequence[int]] | torch.Tensor, *, start: int = 0, batch_size: int = 4
    ) -> torch.Tensor:
        """``log_softmax`` of ``window_logits`` (float32, CPU)."""
        return self.window_logits(windows, start=start, batch_size=batch_size).log_softmax(-1)

    def prefill_footprint(self, ids: Sequence[int]) -> tuple[int, int]:
        """Read ``ids`` into a fresh KV buffer at the current precision, as a reply's prompt is
        read; returns (the buffer's bytes, the peak of torch's allocations during the read above
        what was allocated before: activations and scratch). On a CPU that peak comes from the
        profiler's record of every allocation and free (``profile_memory``), on CUDA from the
        caching allocator's own statistics."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self._decoder is None:
            raise EngineError(
                "Measuring a prefill's memory needs the fast decoder (a Llama-architecture model)."
            )
        cuda = self.torch_device.type == "cuda"
        with self._exclusive(True), torch.inference_mode():
            weights = self._manager.current().weights
            assert weights is not None
            cache = self._decoder.new_cache(len(ids), weights.act_dtype)
            tensor = torch.tensor([list(ids)], dtype=torch.long, device=self.torch_device)
            if cuda:  # the caching allocator keeps its own peak
                torch.cuda.reset_peak_memory_stats(self.torch_device)
                before = torch.cuda.memory_allocated(self.torch_device)
                self._decoder.forward(weights, tensor, cache)
                return cache.data.nbytes, torch.cuda.max_memory_allocated(self.torch_device) - before
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                self._decoder.forward(weights, tensor, cache)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        return cache.data.nbytes, peak

    def continue_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of ``prompts`` at the current precision, each cut before its first
        stop token. Prompts of one length decode as one batch on the fast decoder (a step for four
        costs little more than for one on a CPU); others one by one, as ``generate`` does."""
        import torch

        if self._decoder is None or len({len(p) for p in prompts}) != 1:
            return [
                self.generate(prompt_ids=p, max_new_tokens=max_new_tokens, wait=True).tokens for p in prompts
            ]
        steps: list[torch.Tensor] = []
        with self._exclusive(True), torch.inference_mode():
            weights = self._manager.current().weights
            assert weights is not None
            ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=self.torch_device)
            cache = self._decoder.new_cache(
                ids.shape[1] + max_new_tokens, weights.act_dtype, batch=len(prompts)
            )
            logits = self._decoder.forward(weights, ids, cache)
            for step in range(max_new_tokens):
                steps.append(logits.argmax(-1))
                if step + 1 < max_new_tokens:
                    logits = self._decoder.forward(weights, steps[-1][:, None], cache)
        rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
        return [row[: next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))] for row in rows]

    def close(self) -> None:
        """Drop prepared precisions and references so the memory can be reclaimed."""
        with self._exclusive(True):
            for name in list(self._manager.prepared()):
                self._manager.drop(name)


load_engine = Engine.load

__all__ = ["PRECISIONS", "Engine", "ReplyStream", "load_engine"]
