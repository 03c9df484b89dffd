"""Where a decoded token's time goes, by kind of work (``quant-tutor bench --profile``).

One greedy reply runs under ``torch.profiler``; each operator's own CPU time (``self_cpu``,
children excluded, so nothing is counted twice) is put in a kind by its name, and what the
operators do not account for (Python between them, the decode loop, the profiler's own
bookkeeping) is the rest of the wall time. The profiler slows each operator a little, so the
profiled total is above the unprofiled decode time: read the shares, not the absolute
milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from tutor.engine.engine import Engine

# (kind, name fragments), first match wins; matched against the lower-cased operator name.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The native matvec's calls (quant_tutor::matvec_4bit, _int8, _bf16) by what they multiply.
    ("bnb kernels", ("bitsandbytes", "4bit", "int8", "igemm")),
    ("dense matmul", ("linear", "matmul", "addmm", "mm", "mkldnn", "gemm", "gemv", "matvec")),
    ("attention", ("scaled_dot_product", "attention", "softmax")),
    ("norms", ("rms_norm", "rsqrt", "pow", "mean", "var")),
    ("sampling", ("argmax", "topk", "sort", "multinomial")),
)
OTHER_OPS = "other ops"
OUTSIDE_OPS = "outside ops"  # Python between operators, the decode loop, the profiler's own work
COLUMNS = [kind for kind, _ in KINDS] + [OTHER_OPS, OUTSIDE_OPS]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return OTHER_OPS


def breakdown(self_cpu_us: Sequence[tuple[str, float]], wall_s: float, tokens: int) -> dict[str, float]:
    """Milliseconds per token for each kind, from operators' (name, self CPU µs) and the wall time."""
    per_kind = dict.fromkeys(COLUMNS, 0.0)
    for name, micros in self_cpu_us:
        per_kind[kind_of(name)] += micros / 1000
    per_kind[OUTSIDE_OPS] = max(0.0, wall_s * 1000 - sum(per_kind.values()))
    return {kind: round(ms / max(tokens, 1), 3) for kind, ms in per_kind.items()}


def profile_decode(engine: Engine, prompt_ids: Sequence[int], tokens: int) -> dict[str, Any]:
    """Profile one greedy reply of ``tokens`` new tokens at the engine's precision.

    The prompt is prefilled by a separate reply first and its time is not in the figures: the
    profiled reply's first token (the prefill) is subtracted by profiling a one-token reply too.
    """
    from torch.profiler import ProfilerActivity, profile

    def run(count: int) -> tuple[list[tuple[str, float]], float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            engine.generate(prompt_ids=list(prompt_ids), max_new_tokens=count)
            wall = time.perf_counter() - started
        return [(e.key, float(e.self_cpu_time_total)) for e in prof.key_averages()], wall

    engine.generate(prompt_ids=list(prompt_ids), max_new_tokens=2)  # warm: first-call costs
    first_ops, first_wall = run(1)
    ops, wall = run(tokens)
    prefill = dict(first_ops)
    decode_ops = [(name, max(0.0, micros - prefill.get(name, 0.0))) for name, micros in ops]
    decoded = tokens - 1
    per_token = breakdown(decode_ops, wall - first_wall, decoded)
    return {"precision": engine.precision, "tokens": decoded, "ms_per_token": per_token}
