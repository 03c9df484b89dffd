"""4-bit integer weights on torch's own int4 kernel: round-to-nearest (``int4``) and GPTQ (``gptq4``).

Each row of a weight is cut into groups of ``GROUP`` along its input; a group keeps a scale and
a zero (both bf16) and one code q in 0..15 per weight: w ≈ (q − 8)·scale + zero, which is what
torch's weight-only int4 matmul for CPUs (``_weight_int4pack_mm_for_cpu``) computes with. That is
4 bits plus 32 per 64 weights, 4.5 bits per weight: bitsandbytes' NF4 (an fp32 absmax per 64)
stores the same. The grid's scale and zero are rounded to bf16 before any weight is rounded to
it, so what GPTQ optimises is what the kernel multiplies by.

GPTQ (Frantar et al., 2022) rounds to that same grid column by column, spreading each column's
rounding error over the columns not yet rounded through the inverse Hessian of the layer's
calibration inputs, so the layer's *output* changes least where its inputs put weight.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Imported only when a precision is built (or by the weight lab), so torch at the top is fine.
import torch
from torch import nn

from tutor.engine import native_step
from tutor.engine.linears import bf16_matmul_is_emulated, dense_prefill
from tutor.engine.row_modules import assemble, built_per_job

GROUP = 64  # weights per scale and zero along a row
BITS = 4
STEP = 16  # GPTQ's columns updated one by one before the rest of their group takes them at once
# From this many rows (a prompt's tokens) on, the codes are unpacked for one dense matmul
# (``dense_prefill``): unpacking them costs about 1.3 ms a layer, so on an AVX-512 EPYC the
# kernel wins below 128 rows (2.8 ms a layer against 3.0), the dense matmul above 192 (256
# rows: 4.6 against 5.6; 600: 7.0 against 12.7). A grounded tutor prompt is 250-370 tokens.
DENSE_ROWS = 160
# Where the native kernels unpack the codes (``prefill.cpp``: 0.9 ms a layer against 1.6) the
# dense matmul wins from about 96 rows (a layer, kernel against dense: 64 rows 1.3 against 1.6
# ms, 96 rows 2.0 against 1.9, 128 rows 2.7 against 2.0).
NATIVE_DENSE_ROWS = 80


@dataclass
class Codes:
    """One weight on the grid: codes ``(N, K)`` uint8 and a scale and zero per group ``(N, K/GROUP)``
    (float32 holding bf16 values)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int = BITS

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the codes stand for."""
        mid = 2 ** (self.bits - 1)
        return (self.codes.float() - mid) * self.scale.repeat_interleave(
            GROUP, 1
        ) + self.zero.repeat_interleave(GROUP, 1)


def _grid(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (bf16 values) of each row of ``block`` (rows × group): its range in 2**bits levels."""
    low, high = block.amin(dim=-1), block.amax(dim=-1)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-10).to(torch.bfloat16).float()
    zero = (low + 2 ** (bits - 1) * scale).to(torch.bfloat16).float()
    return scale, zero


def _round(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The nearest code of each value (same shapes)."""
    return ((column - zero) / scale + 2 ** (bits - 1)).round_().clamp_(0, 2**bits - 1)


def round_to_nearest(weight: torch.Tensor, bits: int = BITS) -> Codes:
    """Every weight to its nearest code (no calibration)."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // GROUP, GROUP)
    scale, zero = _grid(groups, bits)
    codes = _round(groups, scale[..., None], zero[..., None], bits)
    return Codes(codes.reshape(rows, cols).to(torch.uint8), scale, zero, bits)


def spread_error(w: torch.Tensor, inverse: torch.Tensor, column: int, rounded: torch.Tensor) -> torch.Tensor:
    """GPTQ's step, in place: move ``w[..., column]`` to ``rounded`` and the later columns so the
    layer's output on the calibration inputs changes least (the optimal brain surgeon update).
    ``inverse`` is the upper Cholesky factor of the inverse Hessian. Returns the scaled error,
    which moves columns outside ``w`` the same way (``error ⊗ inverse[column]``). Leading batch
    dimensions (one weight and inverse each) are carried along."""
    error = (w[..., column] - rounded).div_(inverse[..., column, column, None])
    w[..., column:].addcmul_(error[..., None], inverse[..., None, column, column:], value=-1)
    return error


def gptq(weight: torch.Tensor, hessian: torch.Tensor, *, damp: float, bits: int = BITS) -> Codes:
    """GPTQ on the grid, ``hessian`` being Xᵀ X of the layer's calibration inputs X (n × in),
    dampened by ``damp`` times its mean diagonal."""
    return gptq_batch(weight[None], hessian[None], damp=damp, bits=bits)[0]


def gptq_batch(
    weights: torch.Tensor, hessians: torch.Tensor, *, damp: float, bits: int = BITS
) -> list[Codes]:
    """``gptq`` for a batch of same-shaped weights ``(B, N, K)`` and their Hessians ``(B, K, K)``
    at once: the column loop's small steps serve every weight of the batch.

    Column by column inside a group, each group's scale and zero taken from the group as it is
    when reached; the columns after the group take its updates at once, in one matmul (the
    paper's lazy batch: the same result, far less memory traffic than a rank-one update of the
    whole matrix per column), and inside the group the same again every ``STEP`` columns. A
    rounded column ends on the grid, so its codes are read back from it once the group is done."""
    w = weights.float().clone()
    batch, rows, cols = w.shape
    h = hessians.to(torch.float32, copy=True)
    h += (damp * h.diagonal(dim1=-2, dim2=-1).mean(-1))[:, None, None] * torch.eye(cols)
    # Each step's input freed as soon as the next exists: (B, K, K) float32 is 9 MB a weight
    # for K = 1536, and three of them alive at once were the peak of GPTQ's calibration.
    factor = torch.linalg.cholesky(h)
    del h
    inverted = torch.cholesky_inverse(factor)
    del factor
    inverse = torch.linalg.cholesky(inverted, upper=True)
    del inverted
    codes = torch.empty(batch, rows, cols, dtype=torch.uint8)
    scales, zeros = torch.empty(batch, rows, cols // GROUP), torch.empty(batch, rows, cols // GROUP)
    errors = torch.empty(batch, rows, GROUP)
    mid = 2 ** (bits - 1)
    for group, start in enumerate(range(0, cols, GROUP)):
        end = start + GROUP
        block, local = w[..., start:end].clone(), inverse[:, start:end, start:end]
        scale, zero = _grid(block, bits)
        scales[..., group], zeros[..., group] = scale, zero
        offset = zero - mid * scale  # a code c stands for c * scale + offset
        for first in range(0, GROUP, STEP):
            last = first + STEP
            for i in range(first, last):
                code = _round(block[..., i], scale, zero, bits)
                rounded = code.mul_(scale).add_(offset)
                errors[..., i] = spread_error(block[..., :last], local[:, :last, :last], i, rounded)
            block[..., last:] -= errors[..., first:last] @ local[:, first:last, last:]
        codes[..., start:end] = _round(block, scale[..., None], zero[..., None], bits).to(torch.uint8)
        w[..., end:] -= errors @ inverse[:, start:end, end:]
    return [Codes(codes[b], scales[b], zeros[b], bits) for b in range(batch)]


# --------------------------------------------------------------------------- the module


class Int4Linear(nn.Module):
    """A Linear computing with 4-bit codes through torch's int4 CPU kernel (no bias)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = int(packed.shape[0])
        self.register_buffer("packed", packed)  # (N, K/2) uint8, the kernel's layout
        self.register_buffer("scales_zeros", scales_zeros)  # (K/GROUP, N, 2) bf16
        self.bias = None

    @classmethod
    def from_codes(cls, codes: Codes) -> Int4Linear:
        if codes.bits != BITS:
            raise ValueError(f"torch's int4 kernel takes 4-bit codes, not {codes.bits}-bit")
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.codes.to(torch.int32).contiguous(), 1)
        scales_zeros = torch.stack([codes.scale, codes.zero], dim=-1).transpose(0, 1)
        return cls(packed, scales_zeros.to(torch.bfloat16).contiguous(), int(codes.codes.shape[1])).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] > dense_rows() and unpacks(self.out_features):
            out = dense_prefill(flat, self.dequantized)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernel multiplies by (computed in float32, then in ``dtype``), from its
        packed codes, scales and zeros. In bf16, where the native kernels are loaded, it is
        ``prefill.cpp``'s (the same values, transposed in memory): 0.9 ms a layer against 1.6
        for the passes below (an AVX-512 EPYC, a 600-token prompt's read)."""
        native = native_step.loaded()
        if dtype == torch.bfloat16 and native is not None:
            block = packed_row_block()
            return native.int4_weight_t(self.packed, self.scales_zeros, self.in_features, GROUP, block).t()
        codes = unpacked(self.packed, self.in_features).view(self.out_features, -1, GROUP).float()
        scale, zero = (part.t().float().unsqueeze(-1) for part in self.scales_zeros.unbind(-1))
        weight = codes.sub_(2 ** (BITS - 1)).mul_(scale).add_(zero)
        return weight.view(self.out_features, self.in_features).to(dtype)

    def rows(self, start: int, stop: int) -> nn.Module:
        """The rows ``start:stop`` as a module of their own (the codes shared, not copied).

        The kernel packs rows in blocks whose size depends on the CPU (32 with AVX2, 64 with
        AVX-512): a slice on the block's edges is a packed weight of its own; one across a block
        computes the whole weight and keeps its rows."""
        block = packed_row_block()
        if start % block or (stop % block and stop != self.out_features):
            return RowsOf(self, start, stop).eval()
        packed, scales_zeros = self.packed[start:stop], self.scales_zeros[:, start:stop].contiguous()
        return Int4Linear(packed, scales_zeros, self.in_features).eval()


class RowsOf(nn.Module):
    """Some rows of a module's output, computed with all of them."""

    def __init__(self, whole: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.whole, self.start, self.stop = whole, start, stop
        self.in_features, self.out_features = whole.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whole(x)[..., self.start : self.stop]


def dense_rows() -> int:
    """Above how many rows a weight's codes are unpacked for one dense matmul, in this process
    (the native unpacking serves the bf16 matmul, where the CPU has one)."""
    native = native_step.loaded() is not None and not bf16_matmul_is_emulated()
    return NATIVE_DENSE_ROWS if native else DENSE_ROWS


@functools.cache
def packed_row_block() -> int:
    """How many rows torch's int4 CPU packing keeps together on this CPU (slices of the packed
    weight on multiples of it are the packing of the sliced codes)."""
    probe = torch.randint(
        0, 16, (256, 2 * GROUP), generator=torch.Generator().manual_seed(0), dtype=torch.int32
    )
    whole = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (16, 32, 64, 128):  # the packing takes rows in sixteens at least
        if all(
            torch.equal(
                whole[at : at + block],
                torch._convert_weight_to_int4pack_for_cpu(probe[at : at + block].contiguous(), 1),
            )
            for at in range(0, 256, block)
        ):
            return block
    return 256


def unpacked(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The ``(N, K)`` codes in torch's CPU packing ``(N, K/2)``: for each block of rows and each
    column, half a block of bytes, the low nibbles the block's first half of rows, the high
    nibbles its second (what ``unpacks`` checks on this CPU)."""
    block = packed_row_block()
    rows = int(packed.shape[0])
    halves = packed.view(rows // block, in_features, block // 2)
    return torch.cat([halves & 15, halves >> 4], dim=-1).transpose(1, 2).reshape(rows, in_features)


@functools.cache
def _unpacking_matches() -> bool:
    probe = torch.randint(
        0,
        16,
        (4 * packed_row_block(), 2 * GROUP),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.int32,
    )
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    return torch.equal(unpacked(packed, probe.shape[1]), probe.to(torch.uint8))


def unpacks(rows: int) -> bool:
    """Whether a packed weight of ``rows`` rows can be read back into codes here (whole blocks,
    in the layout ``unpacked`` reads; the packing is the CPU's: other layouts keep the kernel)."""
    return rows % packed_row_block() == 0 and _unpacking_matches()


def build_int4(
    masters: Mapping[str, nn.Linear], codes_of: Mapping[tuple[str, ...], Codes]
) -> tuple[dict[str, nn.Module], dict[tuple[str, ...], nn.Module]]:
    """Int4 modules for every master from ``codes_of`` (job -> the codes of its stacked rows;
    ``tutor.engine.row_modules``). Returns (modules, fused)."""
    return assemble(masters, {job: Int4Linear.from_codes(c) for job, c in codes_of.items()}, "int4")


def rounded_to_nearest(
    masters: Mapping[str, nn.Linear], groups: Sequence[tuple[str, ...]]
) -> dict[tuple[str, ...], Codes]:
    """``int4``'s codes: each group of masters (then each master left) rounded to nearest."""
    return built_per_job(masters, groups, round_to_nearest)
