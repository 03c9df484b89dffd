"""What one answer cost, as the chat, the Lab's compare and ``quant-tutor ask`` show it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from tutor.engine.reports import ReplyStats


@dataclass(frozen=True)
class AnswerStats:
    """Times in seconds, rates in tokens per second, sizes in MiB; None where nothing ran.

    The precision is not here: it belongs to the answer (``TutorAnswer.precision``), which
    names the precision the reply was generated at.
    """

    ttft_s: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None  # decode tokens ÷ decode time
    weights_mib: float | None = None
    device: str | None = None
    peak_rss_mib: float | None = None
    # "eos", "max_tokens", "sentences" (enough said), "loop" (the model went round in circles: cut
    # to the first round), "cancelled" or "cut (why)" (a remote stream
    # broke off); "" if no model ran
    stop: str = ""
    retrieval_ms: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.stop == "cancelled"

    @classmethod
    def from_reply(cls, stats: ReplyStats, stop: str) -> AnswerStats:
        return cls(
            ttft_s=None if stats.ttft_s is None else round(stats.ttft_s, 3),
            tokens=stats.tokens,
            tokens_per_s=None if stats.decode_tok_s is None else round(stats.decode_tok_s, 1),
            weights_mib=stats.weights_mib,
            device=stats.device,
            peak_rss_mib=stats.peak_rss_mib,
            stop=stop,
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cancelled": self.cancelled}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnswerStats:
        """``as_dict``'s inverse (what the engine process sent); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def describe(self, precision: str | None = None) -> str:
        """The line under a reply: ``bf16 · TTFT 0.31 s · 42 tokens · 24.1 tok/s · weights 257 MiB``."""
        parts = [precision] if precision else []
        parts += [
            f"TTFT {_figure(self.ttft_s)} s",
            f"{self.tokens} tokens",
            f"{_figure(self.tokens_per_s)} tok/s",
            f"weights {_figure(self.weights_mib)} MiB",
        ]
        if self.cancelled:
            parts.append("cancelled")
        elif self.stop.startswith("cut"):  # a remote server's stream broke off: what arrived stays
            parts.append(f"✗ {self.stop}")
        elif self.stop == "loop":
            parts.append("stopped: it was repeating itself")
        return " · ".join(parts)


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"
