"""int8 weights with bf16 activations on torch's weight-only int8 CPU kernel (``int8-wo``).

Not LLM.int8 (the lesson's ``int8``, bitsandbytes): no activation is quantized and no outlier
column is kept in 16-bit. Each output row keeps one bf16 scale, its absmax over 127, and each
weight an int8 code: 8 bits per weight plus 16 per row. ``_weight_int8pack_mm`` multiplies bf16
activations by those codes and scales, reading half the bytes of bf16 weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tutor.engine.linears import PREFILL_ROWS, dense_prefill
from tutor.engine.row_modules import assemble, built_per_job

LEVELS = 127  # symmetric: -127..127, so a row's absmax lands on a code


def row_absmax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(N, K)`` int8 and scales ``(N,)`` bf16 for a float weight, rounded to nearest.
    The scale is rounded to bf16 first, so the codes are rounded to the grid the kernel uses."""
    scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / LEVELS).to(torch.bfloat16)
    codes = torch.round(weight / scale.float()[:, None]).clamp(-LEVELS, LEVELS).to(torch.int8)
    return codes, scale


class Int8WoLinear(nn.Module):
    """A Linear computing with int8 weight codes and a bf16 scale per output row (no bias)."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in codes.shape)
        self.register_buffer("codes", codes)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) bf16
        self.bias = None

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8WoLinear:
        return cls(*row_absmax(weight.float())).eval()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, in ``dtype``. A code times a bf16 scale is exact in
        float32, so in bf16 it is rounded once, as the float32 weight cast to bf16 is."""
        if dtype == torch.bfloat16:
            return self.codes.to(dtype) * self.scales[:, None]
        return (self.codes.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] > PREFILL_ROWS:
            out = dense_prefill(flat, self.dequantized)
        else:
            out = torch._weight_int8pack_mm(flat, self.codes, self.scales)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def rows(self, start: int, stop: int) -> Int8WoLinear:
        """The rows ``start:stop`` as a module of their own (the codes shared, not copied)."""
        return Int8WoLinear(self.codes[start:stop], self.scales[start:stop]).eval()


def build_int8wo(
    masters: Mapping[str, nn.Linear], groups: Sequence[tuple[str, ...]]
) -> tuple[dict[str, nn.Module], dict[tuple[str, ...], nn.Module]]:
    """Modules for every master: each group quantized as one stacked weight. (modules, fused)"""
    return assemble(masters, built_per_job(masters, groups, Int8WoLinear.of), "int8-wo")
