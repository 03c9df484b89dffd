"""The weight lab: one real weight matrix quantized to 8, 4, 3 and 2 bits, and what it costs.

For each scheme the matrix is quantized and dequantized with per-block scales, then
compared with the original: the relative RMS error of the weights, and the relative
RMS error of the layer's output on real activations (the inputs that layer saw while
the model read lesson text it was not calibrated on). NF4 and FP4 use bitsandbytes' own
quantizer and int4 rtn / int4 gptq the int4 kernel's grid, so the lab shows exactly what the
tutor's nf4, fp4, int4 and gptq4 precisions do to that layer.

GPTQ (Frantar et al., 2022) rounds to the same int4 grid as round-to-nearest but column by
column, spreading each column's rounding error over the columns not yet rounded through the
inverse Hessian of the layer's calibration inputs, so the *output* error shrinks where the
inputs put weight on it; the weight error may grow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BLOCK = 64  # weights per scale, as bitsandbytes' 4-bit default


@dataclass(frozen=True)
class LabRow:
    scheme: str
    bits: int
    bits_per_weight: float  # including the per-block scale (and minimum) storage
    weight_rel_rms: float
    output_rel_rms: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    flat = w.float().reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        import torch

        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, BLOCK)


def _unblocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return blocks.reshape(-1)[: like.numel()].reshape(like.shape)


def absmax_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one absmax scale per block (levels -127..127)."""
    blocks = _blocks(w)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return _unblocks((blocks / scale).round().clamp(-127, 127) * scale, w)


def round_to_nearest(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The int4 precision's grid at ``bits``: a bf16 scale and zero per 64 weights of a row."""

    def quantize(w: torch.Tensor) -> torch.Tensor:
        from tutor.engine import int4

        return int4.round_to_nearest(w, bits).dequantized()

    return quantize


def bnb_4bit(quant_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def quantize(w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=BLOCK, quant_type=quant_type)
        return bnbf.dequantize_4bit(packed, state).to(w.dtype)

    return quantize


# GPTQ's dampening here (a share of the Hessian's mean diagonal added to it). The paper's 0.01
# assumes hundreds of thousands of calibration tokens; the lab has about a thousand, and at 0.01
# the weights fit them so closely that on other text the layer's output error came out 23 % above
# round-to-nearest's (0.0965 vs 0.0785, 1,024 tokens); at 0.1 it was 12 % below (0.0691 vs 0.0785,
# 2,048 tokens), measured on model.layers.15.mlp.down_proj. (gptq4 calibrates on 4,096 tokens
# at 0.03: ``tutor.engine.calibration``.)
DAMP = 0.1


def gptq(calibration: torch.Tensor, damp: float = DAMP) -> Callable[[torch.Tensor], torch.Tensor]:
    """GPTQ on the int4 grid (``tutor.engine.int4.gptq``, what the gptq4 precision runs),
    calibrated on ``calibration`` (n × in)."""

    def quantize(weight: torch.Tensor) -> torch.Tensor:
        from tutor.engine import int4

        x = calibration.float().reshape(-1, weight.shape[1])
        return int4.gptq(weight, x.T @ x, damp=damp).dequantized()

    return quantize


# (name, bits, bits per weight with scale storage, quantizer, method); fp32 absmax for int8/bnb,
# a bf16 scale and zero for the round-to-nearest schemes and GPTQ (the int4 precisions' grid).
SCHEMES: list[tuple[str, int, float, Callable[[torch.Tensor], torch.Tensor], str]] = [
    ("int8 absmax", 8, 8 + 32 / BLOCK, absmax_int8, f"symmetric, one fp32 absmax per {BLOCK}"),
    ("nf4", 4, 4 + 32 / BLOCK, bnb_4bit("nf4"), f"bitsandbytes NF4, absmax per {BLOCK}"),
    ("fp4", 4, 4 + 32 / BLOCK, bnb_4bit("fp4"), f"bitsandbytes FP4, absmax per {BLOCK}"),
    ("int4 rtn", 4, 4 + 32 / BLOCK, round_to_nearest(4), f"round-to-nearest, bf16 scale+zero per {BLOCK}"),
    ("int3 rtn", 3, 3 + 32 / BLOCK, round_to_nearest(3), f"round-to-nearest, bf16 scale+zero per {BLOCK}"),
    ("int2 rtn", 2, 2 + 32 / BLOCK, round_to_nearest(2), f"round-to-nearest, bf16 scale+zero per {BLOCK}"),
]


def _rel_rms(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.float()
    return float((approx.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def run_lab(weight: torch.Tensor, activations: torch.Tensor, calibration: torch.Tensor) -> list[LabRow]:
    """Quantize ``weight`` (out × in) every way; ``activations`` (n × in) are real inputs to it
    that GPTQ's ``calibration`` inputs (m × in, other text) do not include."""
    x = activations.float().reshape(-1, weight.shape[1])
    reference = x @ weight.float().T
    schemes = [
        *SCHEMES,
        (
            "int4 gptq",
            4,
            4 + 32 / BLOCK,
            gptq(calibration),
            f"GPTQ on the int4 rtn grid, {len(calibration)} inputs",
        ),
    ]
    rows = []
    for name, bits, bpw, quantize, method in schemes:
        approx = quantize(weight)
        rows.append(
            LabRow(
                name,
                bits,
                round(bpw, 2),
                _rel_rms(weight, approx),
                _rel_rms(reference, x @ approx.float().T),
                method,
            )
        )
    return rows
