"""Plain records the engine hands back: load progress, switch reports, replies and their stats.

No torch here, so the TUI can import, type and render them without loading the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1024 * 1024


def mib(n_bytes: int | float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / MIB, 1)


@dataclass(frozen=True)
class LoadProgress:
    """One step of loading: ``stage`` is "convert", "load" or "prepare"; ``done``/``total`` count steps."""

    stage: str
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class WeightsReport:
    """What the weights of one precision are made of, measured from the tensors themselves.

    ``weights_bytes`` counts every parameter and quantization-state tensor the model computes
    with at that precision (the tied embedding / lm_head once). ``quantized_modules`` are the
    decoder Linear layers replaced by bitsandbytes modules; ``kept_modules`` names what stays in
    16-bit (the tied 49152x576 embedding / lm_head, the norms) and ``kept_bytes`` their size.
    """

    precision: str
    weights_bytes: int
    quantized_modules: int
    quantized_bytes: int
    linear_modules: int
    kept_modules: tuple[str, ...]
    kept_bytes: int

    @property
    def weights_mib(self) -> float:
        return round(self.weights_bytes / MIB, 1)

    def describe(self) -> str:
        kept = ", ".join(self.kept_modules) or "nothing"
        if self.quantized_modules:
            return (
                f"{self.precision}: {self.weights_mib} MiB of weights; {self.quantized_modules} of "
                f"{self.linear_modules} decoder Linear layers quantized ({mib(self.quantized_bytes)} MiB); "
                f"kept in 16-bit: {kept} ({mib(self.kept_bytes)} MiB)"
            )
        return f"{self.precision}: {self.weights_mib} MiB of weights; nothing quantized"


@dataclass(frozen=True)
class SwitchReport:
    """The outcome of ``Engine.switch``: how long it took and what memory it holds now."""

    precision: str
    previous: str
    seconds: float
    from_cache: bool  # the precision had been prepared before (a re-switch)
    prepare_seconds: float  # part of ``seconds`` spent building (0 when from_cache)
    weights: WeightsReport
    prepared: tuple[str, ...]  # precisions held ready for an instant switch, active one included
    prepared_bytes: int  # bytes those prepared forms hold beyond the bf16 masters
    prepared_limit_bytes: int
    master_bytes: int  # the bf16 decoder Linear weights kept to rebuild any precision exactly

    @property
    def weights_mib(self) -> float | None:
        return self.weights.weights_mib

    def describe(self) -> str:
        how = "re-switched (prepared earlier)" if self.from_cache else "switched"
        return (
            f"{how} {self.previous} -> {self.precision} in {self.seconds:.2f} s. {self.weights.describe()}. "
            f"Held ready: {', '.join(self.prepared)} ({mib(self.prepared_bytes)} MiB of "
            f"{mib(self.prepared_limit_bytes)} MiB allowed)."
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PrepareReport:
    precision: str
    seconds: float
    from_cache: bool
    prepared_bytes: int


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it added (may be "" mid-character) and its index."""

    token_id: int
    text: str
    index: int


@dataclass
class ReplyStats:
    """Measured for every reply. Times in seconds, rates in tokens per second, sizes in MiB."""

    precision: str
    device: str
    prompt_tokens: int
    tokens: int  # new tokens generated
    ttft_s: float | None  # from the call to the first new token
    prefill_s: float | None
    prefill_tok_s: float | None
    decode_s: float  # after the first token, until the last
    decode_tok_s: float | None  # (tokens - 1) / decode_s
    total_s: float
    weights_mib: float | None  # None where not measured here (a remote engine's)
    rss_mib: float | None
    peak_rss_mib: float | None  # peak resident memory of the process so far
    cuda_peak_mib: float | None
    cancelled: bool
    stop_reason: str  # "eos", "max_tokens" or "cancelled"
    sampling: str  # "greedy" or "sample(t=..., top_p=..., seed=...)"
    decoder: str  # which decode loop ran: "native", "fast", "graph" (each "+cad" too) or "generic"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reply:
    text: str
    tokens: list[int]
    stats: ReplyStats
    prompt_tokens: list[int] = field(default_factory=list)
