"""Comparing two greedy decodes of one model that run on different kernels.

The engine's fast decoder and transformers' own modules compute the same function, but not
with the same kernels: on CPUs with AVX-512 / AMX the engine uses oneDNN with pre-packed
weights and one fused matmul for q|k|v and for gate|up, a batched window pass uses a
(T x K) GEMM where decoding uses a (1 x K) one, and so on. Floating-point sums in another
order round differently, so their logits differ in the last bits, and which kernel wins
depends on the CPU. What *is* guaranteed, and what these helpers check:

* every logit is within ``Tolerance.logit`` of the reference's, and
* the greedy token is the reference's wherever the reference's top-2 margin is at least
  ``Tolerance.margin``: only a near-tie may flip. The tokens are therefore identical up to the
  first position where the reference has a near-tie.

``engine_trace`` records the logits ``engine.generate`` picks each token from (its reply is
their argmax, exactly: same tensors). Up to the first position where the tokens differ both
decodes read the same context, so their logits are compared there. Past a flip the contexts
differ; ``compare_decodes`` then also takes the engine's logits along the *reference's*
tokens (teacher forcing, ``engine_logits_along``, the same decode session) and compares every
position.

The tolerances (``TOLERANCES``) and the measurements they rest on are explained where they
are defined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Tolerance:
    """How far two correct implementations of one precision may drift apart.

    ``logit``: max |Δlogit| over the whole vocabulary at every compared position.
    ``margin``: below this top-2 logit margin in the reference, the greedy pick may differ.
    """

    logit: float
    margin: float


# Why these numbers. Logits here lie in about -30..+45 and the bf16 ones are rounded to bf16,
# whose step is 0.125 for |x| in 16..32 and 0.25 in 32..64: two correct bf16 kernels that only
# sum in another order already disagree by a step or two on the largest logits, and a
# reference margin of 0 (an exact bf16 tie) or 0.125 is common. The flip in the issue (token
# 15 of PROMPT: 540 instead of the reference's 4624, on an AVX-512/AMX Xeon) was at a margin
# of 0.125.
#
# Measured on the AMD EPYC (AVX2, no AVX-512) these tests were written on. There oneDNN cannot
# pack bf16, so the fast decoder calls the very bf16 modules transformers calls, and engine vs
# ``model.generate`` is bit-identical at every precision (max |Δlogit| 0). So a second,
# equally correct kernel was put in on purpose, 16 tokens each of PROMPT and the bench prompt:
#   * the reference's linears summed by the fp32 GEMM instead of the bf16 one (fp32 ones in
#     fp64), and / or its attention (SDPA) computed one precision up, inside ``model.generate``;
#   * a batched window pass (T x K GEMMs) instead of cached decoding (1 x K);
#   * for fp32, the fast decoder with oneDNN packing and q|k|v, gate|up fusion forced on (the
#     path it takes wherever oneDNN's packed linear passes its start-up check).
# Largest differences found, over all of those:
#   precision  max |Δlogit|   max drift of the top-2 gap   flips seen at margins
#   fp32       7e-5           3e-5                         none
#   bf16       0.76           0.375                        none
#   nf4        0.74           0.375                        0.0
#   fp4        0.75           0.25                         0.0, 0.125
#   int8       2.68           1.5                          0.0 .. 0.375
# int8 (LLM.int8) also quantizes the activations (per row, and columns over the 6.0 outlier
# threshold go the 16-bit way), so a last-bit change upstream can move an activation across a
# rounding step or the threshold: it amplifies kernel differences about 4x. Its bound is
# therefore no test of *which* precision ran: int8 and bf16 differ by only 2.4..2.9 here (int8
# weights are close to bf16); that int8 modules are in use is checked by module type instead.
#
# The bounds. bf16 / nf4 / fp4 (2.0 / 1.0) and int8 (6.0 / 3.0): about 2.5x the largest
# measured |Δlogit| and 2-3x the largest gap drift. fp32 (0.01 / 0.02) leaves far more room
# over its 7e-5 (another CPU's fp32 GEMM blocks and vectorizes differently; there is nothing to
# gain by being tight) and is still 50x below the 0.54 by which bf16 differs from fp32 here,
# so an fp32 that silently computed in bf16 fails. Real faults are caught too: nf4 / fp4
# against bf16 differ by 8..12.6 on these prompts, and a wrong weight, rotary table or cache
# slot moves logits by far more. The margins are smaller than the 2x logit bound that would be
# airtight (the gap between two logits each off by at most d moves by at most 2d) because the
# gap drifts much less than the largest of 49152 logits (measured: about half); for fp32 the
# airtight 2x costs nothing and is used.
BF16_COMPUTE = Tolerance(logit=2.0, margin=1.0)
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(logit=0.01, margin=0.02),
    "bf16": BF16_COMPUTE,
    "int8": Tolerance(logit=6.0, margin=3.0),
    "nf4": BF16_COMPUTE,
    "fp4": BF16_COMPUTE,
    # torch's int4 kernel on both sides (the fast decoder's fused q|k|v and gate|up are row views of
    # the same codes, and the kernel computes each output row on its own), bf16 everywhere else.
    "int4": BF16_COMPUTE,
    # torch's weight-only int8 kernel on both sides, the same way (row views of one set of codes).
    "int8-wo": BF16_COMPUTE,
}


@dataclass
class Trace:
    """A greedy decode: ``tokens[i]`` is the argmax of ``logits[i]`` ((n, vocab), float32)."""

    tokens: list[int]
    logits: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """Top-1 minus top-2 logit at each position."""
        top = self.logits.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]


@dataclass
class Comparison:
    """What one comparison found (for messages and for the measurements in the comments)."""

    what: str
    positions: int  # positions whose logits were compared
    max_dlogit: float  # max |Δlogit| over those positions and the whole vocabulary
    max_gap_drift: float  # max change of the reference's top-2 gap (what decides a flip)
    near_ties: list[int]  # positions where the reference's margin is below the tolerance
    flips: list[int] = field(default_factory=list)  # positions where the argmax differs

    def describe(self) -> str:
        return (
            f"{self.what}: {self.positions} positions, max |Δlogit| {self.max_dlogit:.4g}, "
            f"max top-2 gap drift {self.max_gap_drift:.4g}, near-ties at {self.near_ties}, "
            f"flips at {self.flips}"
        )


def reference_trace(model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> Trace:
    """transformers' own greedy ``model.generate`` with the raw logits of every step."""
    import torch

    ids = torch.tensor([list(prompt_ids)], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logits = torch.stack([step[0].float().cpu() for step in out.logits])
    # greedy on the raw logits: no logits processor (penalties, bad words) may be in the way
    assert tokens == logits.argmax(-1).tolist(), "model.generate did not pick the raw argmax"
    return Trace(tokens, logits)


class _Recording:
    """A decode session that keeps a float32 copy of every logits row it returns."""

    def __init__(self, session: Any, rows: list[torch.Tensor]) -> None:
        self.session = session
        self.kind = session.kind
        self.rows = rows

    def _keep(self, logits: torch.Tensor) -> torch.Tensor:
        self.rows.append(logits.detach().float().cpu().clone())
        return logits

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return self._keep(self.session.prefill(ids))

    def step(self, token: int) -> torch.Tensor:
        return self._keep(self.session.step(token))


def engine_trace(
    engine: Any, prompt_ids: Sequence[int], max_new_tokens: int, **options: Any
) -> tuple[Any, Trace]:
    """``engine.generate`` (greedy; ``options``: its other keywords) and the logits it picked
    each token from.

    Returns ``(reply, trace)``; the trace's tokens include a stop token the reply ended on
    (``reply.tokens`` never does), as ``model.generate``'s do.
    """
    import torch

    rows: list[torch.Tensor] = []
    make_session = engine._session
    engine._session = lambda max_len, contrast=None: _Recording(make_session(max_len, contrast), rows)
    try:
        reply = engine.generate(prompt_ids=list(prompt_ids), max_new_tokens=max_new_tokens, **options)
    finally:
        del engine._session  # the class's method again
    logits = torch.stack(rows) if rows else torch.empty(0, 0)
    trace = Trace(logits.argmax(-1).tolist(), logits)
    # the reply is the argmax of the very logits recorded (a stop pick ends it unreported)
    assert trace.tokens[: len(reply.tokens)] == reply.tokens, (trace.tokens, reply.tokens)
    assert len(trace.tokens) - len(reply.tokens) == int(reply.stats.stop_reason == "eos")
    return reply, trace


def engine_logits_along(
    engine: Any, prompt_ids: Sequence[int], tokens: Sequence[int], **options: Any
) -> torch.Tensor:
    """The engine's decode logits along ``tokens`` (teacher forcing), float32 ``(len(tokens), vocab)``.

    Row ``i`` predicts ``tokens[i]`` from ``prompt_ids + tokens[:i]``: a prefill, then one cached
    step per token, in the very session (kernels, KV cache) ``engine.generate`` decodes with
    (context-aware with ``options`` ``contrast`` and ``alpha``, as ``generate``'s).
    """
    import torch

    contrast = None
    if options.get("alpha"):
        contrast = (engine.encode(options["contrast"]), float(options["alpha"]))
    session = engine._session(len(prompt_ids) + max(len(tokens), 1), contrast)
    rows = []
    with torch.inference_mode():
        rows.append(session.prefill(list(prompt_ids)).float().cpu())
        for token in tokens[:-1]:
            rows.append(session.step(int(token)).float().cpu())
    return torch.stack(rows)


def compare_logits(reference: Trace, logits: torch.Tensor, tol: Tolerance, what: str) -> Comparison:
    """Check ``logits`` (same contexts as ``reference``) against it; AssertionError if off.

    Every logit within ``tol.logit``; the argmax equal to the reference's token wherever the
    reference's margin is at least ``tol.margin``.
    """
    import torch

    n = len(reference.tokens)
    assert logits.shape == reference.logits.shape, (
        f"{what}: {tuple(logits.shape)} vs {tuple(reference.logits.shape)}"
    )
    rows = torch.arange(n)
    top2 = reference.logits.topk(2, dim=-1).indices
    first, second = top2[:, 0], top2[:, 1]
    gap_ref = reference.logits[rows, first] - reference.logits[rows, second]
    gap_new = logits[rows, first] - logits[rows, second]
    margins = reference.margins
    picks = logits.argmax(-1).tolist()
    result = Comparison(
        what=what,
        positions=n,
        max_dlogit=float((logits - reference.logits).abs().max()) if n else 0.0,
        max_gap_drift=float((gap_new - gap_ref).abs().max()) if n else 0.0,
        near_ties=[i for i in range(n) if float(margins[i]) < tol.margin],
        flips=[i for i in range(n) if picks[i] != reference.tokens[i]],
    )
    assert result.max_dlogit < tol.logit, f"max |Δlogit| over {tol.logit}: {result.describe()}"
    unexplained = [i for i in result.flips if i not in result.near_ties]
    assert not unexplained, (
        f"tokens differ where the reference's margin is >= {tol.margin} "
        f"(at {[(i, round(float(margins[i]), 4)) for i in unexplained]}): {result.describe()}"
    )
    return result


def compare_decodes(
    reference: Trace,
    decoded: Trace,
    tol: Tolerance,
    what: str,
    *,
    along_reference: Callable[[], torch.Tensor] | None = None,
) -> Comparison:
    """A free-running greedy decode against a reference decode of the same prompt.

    Identical tokens up to the first position where they differ, which must be a near-tie of
    the reference; logits within ``tol`` on every position up to and including it (same
    context). If they diverged, ``along_reference()`` (the decoder's logits along the
    reference's tokens) extends the comparison to every position.
    """
    common = min(len(reference.tokens), len(decoded.tokens))
    diverged = next((i for i in range(common) if reference.tokens[i] != decoded.tokens[i]), common)
    if diverged == common:  # both ran to the token limit, or stopped at the same place
        assert len(reference.tokens) == len(decoded.tokens), f"{what}: {decoded.tokens} vs {reference.tokens}"
    shared = min(diverged + 1, common)
    result = compare_logits(
        Trace(reference.tokens[:shared], reference.logits[:shared]), decoded.logits[:shared], tol, what
    )
    if diverged < common and along_reference is not None:
        result = compare_logits(reference, along_reference(), tol, f"{what}, along the reference's tokens")
    return result


def graph_against_eager(
    engine: Any, prompt_ids: Sequence[int], max_new_tokens: int, **options: Any
) -> tuple[Any, Comparison]:
    """The engine's greedy decode with its steps on ``tutor.engine.graphs`` (recorded as a CUDA
    graph on a GPU, run as they are elsewhere) against the same decode with eager steps, at the
    engine's precision (``options``: ``engine.generate``'s, e.g. ``contrast`` and ``alpha``).
    Returns the graph decode's reply and the comparison (within the precision's tolerance,
    three times it context-aware, as ``mix_contrast`` scales each side's rounding: the static
    step attends over the whole cache, another sum order)."""
    decoder = engine._decoder
    was = decoder.graphs
    try:
        decoder.graphs = False
        _, eager = engine_trace(engine, prompt_ids, max_new_tokens, **options)
        decoder.graphs = True
        reply, graphed = engine_trace(engine, prompt_ids, max_new_tokens, **options)
    finally:
        decoder.graphs = was
    tol = TOLERANCES[engine.precision]
    if options.get("alpha"):
        tol = Tolerance(3 * tol.logit, 3 * tol.margin)
    comparison = compare_decodes(
        eager,
        graphed,
        tol,
        f"{engine.precision} graph steps vs eager",
        along_reference=lambda: _graph_logits_along(engine, prompt_ids, eager.tokens, options),
    )
    return reply, comparison


def _graph_logits_along(
    engine: Any, prompt_ids: Sequence[int], tokens: Sequence[int], options: dict[str, Any]
) -> torch.Tensor:
    decoder = engine._decoder
    was, decoder.graphs = decoder.graphs, True
    try:
        return engine_logits_along(engine, prompt_ids, tokens, **options)
    finally:
        decoder.graphs = was
