"""The per-token math of the quality measurement: one precision's next-token distributions
against the reference's, summed over the scored places of the lesson windows.

``Reference`` holds one window's reference distributions; ``SpooledReferences`` keeps every
window's on disk while the other precisions read theirs; ``Tally`` adds each window at one
precision to its running ``Sums`` (negative log-likelihood, KL(reference ‖ precision), same top
token, tokens), from which :mod:`tutor.lab.measure` makes PPL, mean KL and top-1 agreement.
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Reference:
    """One window's reference distributions, as the tally needs them (``n`` scored positions)."""

    logprobs: torch.Tensor  # (n, vocab)
    top: torch.Tensor  # (n,) the reference's top token
    nll: float  # the reference's own negative log-likelihood of the targets, summed

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        """``(n, vocab)``, when a precision is scored against this window (the reference's own
        pass, which spools the log-probs, never needs them)."""
        return self.logprobs.exp()

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> Reference:
        """From ``(n, vocab)`` logits, normalized in place (the tensor becomes ``logprobs``)."""
        logprobs = log_softmax_(logits)
        return cls(
            logprobs=logprobs,
            top=logprobs.argmax(-1),
            nll=-float(logprobs.gather(-1, targets.unsqueeze(-1)).sum()),
        )


class SpooledReferences:
    """Every window's reference distributions in a temporary file, read back one window at a time.

    All lesson text is 53 windows of 127 scored places over a 49,152-token vocabulary: 1.3 GB of
    float32 log-probs, more than the whole measurement may hold. As llama.cpp's
    ``--kl-divergence-base`` file does, they go to disk once and each precision is scored
    against them window by window; only the top tokens and the NLL stay in memory. The file is
    deleted when closed, or by the OS if the process dies.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder, prefix="reference-")  # noqa: SIM115 (closed by __exit__)
        self._held: list[tuple[int, torch.Size, torch.dtype, torch.Tensor, float]] = []

    def __enter__(self) -> SpooledReferences:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._file.close()

    def append(self, reference: Reference) -> None:
        import torch

        logprobs = reference.logprobs.contiguous()
        offset = self._file.seek(0, 2)
        self._file.write(logprobs.view(-1).view(torch.uint8).numpy().data)
        self._held.append((offset, logprobs.shape, logprobs.dtype, reference.top, reference.nll))

    def __getitem__(self, index: int) -> Reference:
        import torch

        offset, shape, dtype, top, nll = self._held[index]
        logprobs = torch.empty(shape, dtype=dtype)
        self._file.seek(offset)
        self._file.readinto(logprobs.view(-1).view(torch.uint8).numpy().data)
        return Reference(logprobs=logprobs, top=top, nll=nll)


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the last dimension, in place (one window's temporary at most)."""
    return logits.sub_(logits.logsumexp(-1, keepdim=True))


@dataclass
class Sums:
    """Running sums over the scored places of one precision (a remote estimate keeps them too)."""

    nll: float = 0.0
    kl: float = 0.0
    same_top: int = 0
    tokens: int = 0


@dataclass
class Tally(Sums):
    # Read while the precision is installed: by the time its row is written, a GPU engine's
    # memory bound may have dropped that precision again.
    weights_mib: float = math.nan

    def add(self, logits: torch.Tensor, targets: torch.Tensor, reference: Reference) -> None:
        """Add one window: ``logits`` ``(n, vocab)`` at this precision, consumed (changed in place).

        KL(p ‖ q) = Σ p (log p - log q) is summed from the elementwise differences, so a
        small divergence is not lost in the rounding of two large sums.
        """
        logprobs = log_softmax_(logits)
        self.nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        self.same_top += int((logprobs.argmax(-1) == reference.top).sum())
        difference = logprobs.sub_(reference.logprobs)  # log q - log p, in place
        self.kl -= float((reference.probs.unsqueeze(1) @ difference.unsqueeze(2)).sum())
        self.tokens += targets.numel()

    def add_reference(self, reference: Reference, tokens: int) -> None:
        """The reference against itself: KL 0 and every top token shared, by definition."""
        self.nll += reference.nll
        self.same_top += tokens
        self.tokens += tokens
