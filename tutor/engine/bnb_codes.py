"""bitsandbytes' 4-bit codes and absmax, computed quickly and bit for bit as it computes them.

On CPU bitsandbytes quantizes 4-bit with a pure-torch reference (``torch.bucketize`` over every
weight: about 3 s for this model's 106M decoder weights), then re-packs the result for its
AVX-512 BF16 kernel on the first forward. Here ``_codes`` computes the very same codes and
absmax with a lookup table instead of a binary search, and on such CPUs writes them straight
into the kernel's tiled layout (``quantize_4bit_cpu_tiled``). Both are tested bit-identical to
what bitsandbytes produces.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCKSIZE = 64
_CELLS = 4096  # lookup-table cells over [-1, 1]
_CHUNK = 1 << 20  # elements per quantization chunk (keeps the intermediates in cache)


@functools.cache
def _lookup_table(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bounds, order, base, threshold) for ``quant_type``.

    bitsandbytes maps a scaled weight x in [-1, 1] to ``bucketize(x, bounds)`` (how many of the
    15 midpoints between adjacent codes lie strictly below x), then through ``order`` for fp4.
    Cut [-1, 1] into ``_CELLS`` equal cells; ``base[c]`` is that count at a point a quarter cell
    below cell c, and ``threshold[c]`` the next midpoint above it. Where no cell (widened by a
    quarter on each side) holds two midpoints, every x in cell c has count
    ``base[c] + (x > threshold[c])`` exactly; this is checked here.
    """
    import torch
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    bounds = bounds.float().cpu()
    half = _CELLS / 2
    starts = torch.arange(_CELLS, dtype=torch.float64) / half - 1
    probe = (starts - 0.25 / half).float()
    probe_end = (starts + 1.25 / half).float()
    base = torch.bucketize(probe, bounds, out_int32=True)
    spread = torch.bucketize(probe_end, bounds, out_int32=True) - base
    if int(spread.max()) > 1:  # pragma: no cover - would need codes closer than a cell
        raise RuntimeError(f"4-bit lookup table too coarse for {quant_type}")
    extended = torch.cat([bounds, torch.tensor([float("inf")])])
    threshold = extended.index_select(0, base).contiguous()
    return bounds, order.to(torch.uint8).cpu(), base.to(torch.uint8), threshold


def _codes(chunk: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One uint8 code per weight of ``chunk`` (a multiple of 64 long) and float32 absmax per block."""
    import torch

    _bounds, order, base, threshold = _lookup_table(quant_type)
    blocks = chunk.to(torch.float32, copy=True).view(-1, BLOCKSIZE)  # scaled in place below
    amax = blocks.abs().amax(dim=-1)
    scaled = blocks.mul_((1.0 / amax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    cell = (scaled + 1).mul_(_CELLS / 2).to(torch.int32).clamp_(max=_CELLS - 1)
    codes = base.index_select(0, cell)
    codes += scaled > threshold.index_select(0, cell)
    if quant_type != "nf4":
        codes = order.index_select(0, codes.to(torch.int32))
    return codes, amax


def quantize_4bit_cpu(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes packed two per byte (shape ``(n/2, 1)``) and float32 absmax per block of 64.

    Equals ``torch.ops.bitsandbytes.quantize_4bit(weight, 64, quant_type, torch.uint8)`` bit for
    bit, for weights whose size is a multiple of 64 (every Linear here).
    """
    import torch

    flat = weight.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty(n // 2, dtype=torch.uint8)
    absmax = torch.empty(n // BLOCKSIZE, dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        codes, amax = _codes(flat[start:stop], quant_type)
        absmax[start // BLOCKSIZE : stop // BLOCKSIZE] = amax
        pairs = codes.view(-1, 2)
        torch.bitwise_or(pairs[:, 0] << 4, pairs[:, 1], out=packed[start // 2 : stop // 2])
    return packed.unsqueeze(1), absmax


CPU_BLOCK_N = 32  # rows per tile in bitsandbytes' AVX-512 BF16 4-bit layout


def quantize_4bit_cpu_tiled(weight: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same codes directly in the layout bitsandbytes' AVX-512 BF16 kernel reads.

    bitsandbytes quantizes to the standard layout, then on the first CPU forward re-packs it
    (``bitsandbytes.functional._convert_weight_packed_for_cpu``: tiles of 32 rows, the low and
    high nibbles of a byte from rows r and r + 16... of one column pair). Producing that layout
    straight away skips a pack / unpack / re-pack round trip. Returns ``(packed (N, K/2) uint8,
    absmax (N, K/64) float32)``; the tests check the module computes exactly what
    bitsandbytes' own conversion gives.
    """
    import torch

    rows, cols = weight.shape
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    absmax = torch.empty(rows, cols // BLOCKSIZE, dtype=torch.float32)
    step = max(CPU_BLOCK_N, (_CHUNK // cols) // CPU_BLOCK_N * CPU_BLOCK_N)
    w = weight.detach()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes, amax = _codes(w[r0:r1].reshape(-1), quant_type)
        absmax[r0:r1] = amax.view(r1 - r0, -1)
        tiles = codes.view((r1 - r0) // CPU_BLOCK_N, CPU_BLOCK_N, cols // 2, 2).transpose(1, 2)
        tiles = tiles.reshape(-1, 2 * CPU_BLOCK_N)
        out = packed[r0:r1].view(-1, CPU_BLOCK_N)
        torch.bitwise_or(tiles[:, CPU_BLOCK_N:] << 4, tiles[:, :CPU_BLOCK_N], out=out)
    return packed, absmax
