"""Every bf16 master Linear of a model made a bitsandbytes module, fusing where that is exact.

Modules that read the same input (q|k|v, gate|up) are built as one fused bitsandbytes module
whose rows are theirs; the per-module modules put into the model are views of its codes. int8
and 4-bit quantize within rows, so nothing changes numerically (tested), and the decoder pays
bitsandbytes' per-call overhead 4 times per layer instead of 7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tutor.engine.bnb_codes import BLOCKSIZE, CPU_BLOCK_N
from tutor.engine.bnb_modules import linear4_from, linear8_from, new_module, tiled_state, warm_up

if TYPE_CHECKING:
    import torch
    from torch import nn


def can_fuse(precision: str, masters: Sequence[nn.Linear], double_quant: bool) -> bool:
    """Whether modules reading the same input can share one bitsandbytes module, exactly.

    int8 quantizes row by row and 4-bit in blocks of 64 along a row, so stacking the weights'
    rows changes no code or scale; the fused module's output rows are the separate modules'
    outputs. Not with double quant (its second-level blocks and offset span the whole weight),
    and for the CPU layout only when every part is a whole number of 32-row tiles.
    """
    if not masters or len({m.in_features for m in masters}) != 1:
        return False
    if any(m.weight.device.type != "cpu" for m in masters):
        return False
    if precision == "int8":
        return True
    if double_quant or masters[0].in_features % BLOCKSIZE:
        return False
    return all(m.out_features % CPU_BLOCK_N == 0 for m in masters)


def _split(
    fused: nn.Module,
    precision: str,
    sizes: Sequence[int],
    threshold: float,
    double_quant: bool,
    compute_dtype: torch.dtype,
    biases: Sequence[torch.Tensor | None],
) -> list[nn.Module]:
    """Per-part modules whose tensors are row slices of ``fused`` (no copies of the codes)."""
    import torch
    from bitsandbytes.functional import QuantState

    parts: list[nn.Module] = []
    start = 0
    weight: Any = fused.weight
    for size, bias in zip(sizes, biases, strict=True):
        stop = start + size
        if precision == "int8":
            parts.append(linear8_from(weight.CB[start:stop], weight.SCB[start:stop], bias, threshold))
        else:
            state = weight.quant_state
            cols = state.shape[1]
            if getattr(state, "packing_format_for_cpu", False):
                part_state = tiled_state(
                    state.absmax[:, start:stop].contiguous(),
                    torch.Size([size, cols]),
                    state.original_dtype,
                    state.code,
                    state.quant_type,
                    double_quant,
                )
                packed = weight.data[start:stop]
            else:
                part_state = QuantState(
                    absmax=state.absmax[start * cols // BLOCKSIZE : stop * cols // BLOCKSIZE],
                    shape=torch.Size([size, cols]),
                    dtype=state.dtype,
                    blocksize=BLOCKSIZE,
                    code=state.code,
                    quant_type=state.quant_type,
                )
                packed = weight.data.view(-1)[start * cols // 2 : stop * cols // 2].view(-1, 1)
            parts.append(linear4_from(packed, part_state, bias, precision, double_quant, compute_dtype))
        start = stop
    return parts


@dataclass
class Built:
    """The bitsandbytes modules of one precision: one per master, plus fused groups."""

    modules: dict[str, nn.Module]  # master name -> module (what goes into the model)
    fused: dict[tuple[str, ...], nn.Module]  # group of master names -> one module computing all their rows


def build_all(
    precision: str,
    masters: Mapping[str, nn.Linear],
    *,
    groups: Sequence[tuple[str, ...]] = (),
    workers: int = 1,
    int8_threshold: float = 6.0,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> Built:
    """bitsandbytes modules for every master; ``groups`` of masters sharing an input are fused
    where that is exact (``can_fuse``), their per-master modules then being views of the fused
    one. ``workers`` > 1 builds in parallel threads."""
    import torch

    dtype = compute_dtype or torch.bfloat16
    options: dict[str, Any] = {
        "int8_threshold": int8_threshold,
        "double_quant": double_quant,
        "compute_dtype": dtype,
    }
    jobs: list[tuple[str, ...]] = []
    grouped: set[str] = set()
    for group in groups:
        parts = [masters[name] for name in group]
        if can_fuse(precision, parts, double_quant):
            jobs.append(tuple(group))
            grouped.update(group)
    jobs.extend((name,) for name in masters if name not in grouped)

    def run(job: tuple[str, ...]) -> tuple[tuple[str, ...], nn.Module | None, list[nn.Module]]:
        parts = [masters[name] for name in job]
        first = parts[0]
        device = first.weight.device
        biases = [None if m.bias is None else m.bias.detach() for m in parts]
        if len(job) == 1:
            module = new_module(precision, first.weight.detach(), biases[0], **options)
            return job, None, [warm_up(module, first.in_features, dtype, device)]
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in parts])
        fused = new_module(precision, weight, None, **options)
        del weight
        split = _split(
            fused, precision, [m.out_features for m in parts], int8_threshold, double_quant, dtype, biases
        )
        if any(b is not None for b in biases):
            fused.bias = torch.nn.Parameter(
                torch.cat(
                    [
                        b
                        if b is not None
                        else torch.zeros(m.out_features, dtype=first.weight.dtype, device=device)
                        for b, m in zip(biases, parts, strict=True)
                    ]
                ),
                requires_grad=False,
            )
        # The fused module is what decodes; the views share its codes and are only set to eval
        # (bitsandbytes finishes their lazy set-up on their first call, if they ever get one).
        warm_up(fused, first.in_features, dtype, device)
        for module in split:
            module.eval()
        return job, fused, split

    if workers <= 1:
        results = [run(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantize") as pool:
            results = list(pool.map(run, jobs))
    built = Built({}, {})
    for job, fused, split in results:
        built.modules.update(zip(job, split, strict=True))
        if fused is not None:
            built.fused[job] = fused
    built.modules = {name: built.modules[name] for name in masters}
    return built
