"""Decode steps replayed as CUDA graphs: on a GPU, a small model's step is hundreds of tiny
kernels, and launching each from Python costs more than running it.

``StaticStep`` holds one KV cache and the device tensors a step reads (each row's token and
first slot, and the position); ``FastDecoder.static_step`` computes a step from them without a
shape or host value that changes from one step to the next. On CUDA the step is recorded once
as a graph and each token is then one replay; elsewhere (the tests on CPU) it runs as it is,
the same arithmetic. A reply is one row, or two when it decodes context-aware (the prompt with
the passages and the one without, as ``sessions.FastContrastSession``). Steps live on the
precision's ``DecoderWeights`` (one per row count and cache size), so a graph is recorded once
for each, serves every reply after it, and goes when the precision is dropped. Replies on one
engine run one at a time, so they can share a step's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Imported only once a model is being loaded (as the decoder is), so torch at the top is fine here.
import torch

from tutor.engine.decoder import FastDecoder, KVCache
from tutor.engine.decoder_weights import DecoderWeights
from tutor.engine.sessions import mix_contrast, prefill_rows

# Cache sizes are rounded up to a power of two, at least this, so that replies of different
# lengths share a few graphs instead of recording one each.
SMALLEST_CACHE = 1024
# LLM.int8 finds each step's outlier columns on the host (bitsandbytes' ``argwhere``), which a
# graph cannot record; it decodes eagerly.
NOT_RECORDABLE = {"int8": "LLM.int8 looks up each step's outlier columns on the host"}


def cache_size(max_len: int, limit: int) -> int:
    """The cache size a reply of ``max_len`` positions uses: a power of two, capped at ``limit``
    (the model's positions) when that still holds the reply."""
    size = SMALLEST_CACHE
    while size < max_len:
        size *= 2
    return max(max_len, min(size, limit))


class StaticStep:
    """One precision's decode step for ``rows`` rows over a cache of ``max_len`` positions,
    recorded as a CUDA graph when ``record`` (on a CUDA device)."""

    def __init__(
        self, decoder: FastDecoder, weights: DecoderWeights, max_len: int, rows: int, record: bool
    ) -> None:
        device = decoder.device
        self.decoder = decoder
        self.cache = decoder.new_cache(max_len, weights.act_dtype, batch=rows)
        # Zeros, not whatever the memory held: a masked slot's score weighs 0, and 0 x NaN is NaN.
        self.cache.data.zero_()
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.first = torch.zeros(rows, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.rope = decoder.rope_tables(max_len, weights.act_dtype)  # held: a graph reads them in place
        self.keys = torch.arange(max_len, device=device)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None
        if record:
            self._record(weights)

    def _compute(self, weights: DecoderWeights) -> torch.Tensor:
        return self.decoder.static_step(
            weights, self.token, self.position, self.first, self.cache, self.rope, self.keys
        )

    def _record(self, weights: DecoderWeights) -> None:
        """Warm up on a side stream (first calls allocate workspaces, which a graph must not),
        then record. Both write slot 0 of the cache, which a reply's prompt then overwrites."""
        side = torch.cuda.Stream(self.cache.data.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._compute(weights)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Only this thread's calls are checked while recording: a precision built alongside a
        # reply (``Engine.prepare(exclusive=False)``) may use the GPU from another thread.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._compute(weights)
        self.graph = graph

    def __call__(self, weights: DecoderWeights, token: int, position: int) -> torch.Tensor:
        """Each row's logits after ``token`` at ``position`` (every row reads the same token, as
        context-aware decoding's two do): a fresh tensor (the graph's own output is overwritten
        by the next replay)."""
        self.token.fill_(token)
        self.position.fill_(position)
        if self.graph is None:
            return self._compute(weights)
        self.graph.replay()
        assert self.logits is not None
        return self.logits.clone()


def static_step(decoder: FastDecoder, weights: DecoderWeights, max_len: int, rows: int) -> StaticStep | None:
    """The precision's recorded step for replies of ``rows`` rows and ``max_len`` positions
    (recorded now if it is the first), or None where it cannot be recorded: then
    ``weights.graph_problem`` says why."""
    if weights.graph_problem is not None:
        return None
    key = (rows, cache_size(max_len, decoder.max_positions))
    step = weights.steps.get(key)
    if step is not None:
        return step
    problem = NOT_RECORDABLE.get(weights.precision)
    if problem is None:
        try:
            with torch.inference_mode():
                step = StaticStep(decoder, weights, key[1], rows, record=decoder.device.type == "cuda")
        except Exception as exc:  # an op that syncs with the host, or one a graph cannot hold: eager
            problem = f"recording the step failed: {exc}"
    if step is None:
        weights.graph_problem = problem
        return None
    weights.steps[key] = step
    return step


class GraphSession:
    """One reply on the fast decoder whose steps replay a recorded CUDA graph: the prompt (and,
    with ``contrast``, the prompt without the passages) is read as usual into the step's cache,
    then each token is one replay. With ``contrast`` (that prompt's ids, alpha) it decodes
    context-aware, as ``sessions.FastContrastSession`` does."""

    def __init__(
        self, step: StaticStep, weights: DecoderWeights, contrast: tuple[list[int], float] | None
    ) -> None:
        self.static = step
        self.weights = weights
        self.contrast = contrast
        self.kind = "graph" if contrast is None else "graph+cad"
        self.cache = KVCache(step.cache.data)

    def _mixed(self, logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if self.contrast is None:
            return logits[0]
        return mix_contrast(logits[0], logits[1], self.contrast[1])

    def prefill(self, ids: list[int]) -> torch.Tensor:
        rows = [ids] if self.contrast is None else [ids, self.contrast[0]]
        logits, pads = prefill_rows(self.static.decoder, self.weights, self.cache, rows)
        self.static.first.copy_(torch.tensor(pads))
        return self._mixed(logits)

    def step(self, token: int) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions, {self.cache.length + 1} needed")
        logits = self.static(self.weights, token, self.cache.length)
        self.cache.length += 1
        return self._mixed(logits)
