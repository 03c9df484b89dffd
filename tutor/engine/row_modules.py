"""Quantized Linear modules on torch's own weight-only CPU kernels, put in the masters' places.

A *job* is the masters that read one input (q|k|v, gate|up) stacked row under row, or one
master alone. Each job is quantized as one weight and becomes one module; its masters' modules
are row views of it (the weights shared, not copied), and the fast decoder calls the job's
module once for the group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import torch
from torch import nn


class RowModule(Protocol):
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, start: int, stop: int) -> nn.Module: ...


M = TypeVar("M", bound=RowModule)
T = TypeVar("T")


def jobs(masters: Mapping[str, nn.Linear], groups: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Each group of masters, then each master in no group, alone."""
    grouped = {name for group in groups for name in group}
    return [*map(tuple, groups), *((name,) for name in masters if name not in grouped)]


def stacked(masters: Mapping[str, nn.Linear], job: tuple[str, ...]) -> torch.Tensor:
    """The rows of ``job``'s masters, one under the other (what reads their shared input)."""
    with torch.no_grad():
        return torch.cat([masters[name].weight.detach().float() for name in job])


def assemble(
    masters: Mapping[str, nn.Linear], built: Mapping[tuple[str, ...], M], kind: str
) -> tuple[dict[str, nn.Module], dict[tuple[str, ...], nn.Module]]:
    """Every master's module from ``built`` (job -> its module). Returns (modules, fused)."""
    modules: dict[str, nn.Module] = {}
    fused: dict[tuple[str, ...], nn.Module] = {}
    for job, module in built.items():
        with torch.inference_mode():  # a kernel's first call sets itself up: now, not in a reply
            module(torch.zeros(1, module.in_features, dtype=torch.bfloat16))
        if len(job) == 1:
            modules[job[0]] = module  # type: ignore[assignment]
            continue
        fused[job] = module  # type: ignore[assignment]
        start = 0
        for name in job:
            stop = start + masters[name].out_features
            modules[name] = module.rows(start, stop)
            start = stop
    missing = set(masters) - set(modules)
    if missing:
        raise ValueError(f"no {kind} weights for {sorted(missing)[0]} (and {len(missing) - 1} more)")
    return {name: modules[name] for name in masters}, fused


def built_per_job(
    masters: Mapping[str, nn.Linear], groups: Sequence[tuple[str, ...]], make: Callable[[torch.Tensor], T]
) -> dict[tuple[str, ...], T]:
    """``make`` applied to each job's stacked weight."""
    return {job: make(stacked(masters, job)) for job in jobs(masters, groups)}
