"""Build bitsandbytes modules from bf16 master Linear layers, quickly and exactly.

int8 follows ``Int8Params._quantize`` (fp16 rows, absmax per row via
``bitsandbytes.functional.int8_vectorwise_quant``). 4-bit on CUDA uses bitsandbytes' own
``quantize_4bit`` kernel. On CPU bitsandbytes quantizes 4-bit with a pure-torch reference
(``torch.bucketize`` over every weight: about 3 s for this model's 106M decoder weights), then
re-packs the result for its AVX-512 BF16 kernel on the first forward. Here ``_codes`` computes
the very same codes and absmax with a lookup table instead of a binary search, and on such CPUs
writes them straight into the kernel's tiled layout (``quantize_4bit_cpu_tiled``). Both are
tested bit-identical to what bitsandbytes produces.

Modules that read the same input (q|k|v, gate|up) are built as one fused bitsandbytes module
whose rows are theirs; the per-module modules put into the model are views of its codes. int8
and 4-bit quantize within rows, so nothing changes numerically (tested), and the decoder pays
bitsandbytes' per-call overhead 4 times per layer instead of 7.

The modules the decoder calls are warmed up with one forward pass on zeros, so bitsandbytes'
lazy first-call work happens while preparing a precision and a broken kernel shows up as a
failed switch, not as a failed reply.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from torch import nn

BLOCKSIZE = 64
_CELLS = 4096  # lookup-table cells over [-1, 1]
_CHUNK = 1 << 20  # elements per quantization chunk (keeps the intermediates in cache)


@functools.cache
def import_bitsandbytes() -> Any:
    """Import bitsandbytes with its chatter silenced.

    On CPUs with AVX-512 BF16 it warns at import that the optional ``kernels`` package is missing,
    and ``Linear8bitLt`` warns on every call that bf16 inputs are cast to fp16. Python prints
    unhandled warnings to stderr, which would scribble over a terminal UI.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


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


def _cpu_tiled_ok(weight: torch.Tensor) -> bool:
    """Whether bitsandbytes would re-pack this weight for its AVX-512 BF16 kernel on first use."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return False
    rows, cols = weight.shape
    if rows % CPU_BLOCK_N or cols % BLOCKSIZE:
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _new_linear8(weight: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> nn.Module:
    """As ``Int8Params._quantize``: fp16 rows, int8 codes with one absmax per row."""
    import torch

    bnb = import_bitsandbytes()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
    return _linear8_from(cb, scb, bias, threshold)


def _linear8_from(
    cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> nn.Module:
    import torch

    import_bitsandbytes()
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    rows, cols = cb.shape
    with torch.device("meta"):
        module = Linear8bitLt(cols, rows, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    module.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return module


def _new_linear4(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
) -> nn.Module:
    import torch

    bnb = import_bitsandbytes()
    from bitsandbytes.functional import QuantState, dequantize_blockwise, get_4bit_type, quantize_blockwise

    code = get_4bit_type(quant_type, device=weight.device)
    state: QuantState
    if _cpu_tiled_ok(weight):
        packed, absmax = quantize_4bit_cpu_tiled(weight, quant_type)
        absmax = absmax.view(-1)
        if double_quant:  # quantized scales, then expanded again as bitsandbytes' CPU re-pack does
            offset = absmax.mean()
            qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
            absmax = dequantize_blockwise(qabsmax, state2)
            absmax += offset
            absmax = absmax.float()
        rows, cols = weight.shape
        state = _tiled_state(
            absmax.reshape(rows, cols // BLOCKSIZE).T.to(torch.bfloat16).contiguous(),
            weight.shape,
            weight.dtype,
            code,
            quant_type,
            double_quant,
        )
    elif weight.device.type == "cpu" and weight.numel() % BLOCKSIZE == 0:
        packed, absmax = quantize_4bit_cpu(weight, quant_type)
        if double_quant:  # as bitsandbytes.functional.quantize_4bit(compress_statistics=True)
            offset = absmax.mean()
            qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
            state = QuantState(
                absmax=qabsmax,
                shape=weight.shape,
                dtype=weight.dtype,
                blocksize=BLOCKSIZE,
                code=code,
                quant_type=quant_type,
                offset=offset,
                state2=state2,
            )
        else:
            state = QuantState(
                absmax=absmax,
                shape=weight.shape,
                dtype=weight.dtype,
                blocksize=BLOCKSIZE,
                code=code,
                quant_type=quant_type,
            )
    else:
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
        )
    return _linear4_from(packed, state, bias, quant_type, double_quant, compute_dtype)


def _tiled_state(
    absmax: torch.Tensor,
    shape: torch.Size,
    original_dtype: torch.dtype,
    code: torch.Tensor,
    quant_type: str,
    double_quant: bool,
) -> Any:
    """A QuantState for the AVX-512 BF16 layout, as ``_convert_weight_packed_for_cpu`` leaves it."""
    import torch
    from bitsandbytes.functional import QuantState

    state: Any = QuantState(
        absmax=absmax,
        shape=shape,
        dtype=torch.bfloat16,
        blocksize=BLOCKSIZE,
        code=code,
        quant_type=quant_type,
    )
    # what the re-pack records, so its inverse (saving, .cuda()) still works
    state.original_dtype = original_dtype
    state.original_nested = double_quant
    state.original_qshape = torch.Size([shape[0] * shape[1] // 2, 1])
    state.packing_format_for_cpu = True
    return state


def _linear4_from(
    packed: torch.Tensor,
    state: Any,
    bias: torch.Tensor | None,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
) -> nn.Module:
    import torch

    import_bitsandbytes()
    from bitsandbytes.nn import Linear4bit, Params4bit

    rows, cols = state.shape
    with torch.device("meta"):
        module = Linear4bit(
            cols,
            rows,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
    module.weight = Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = state
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    return module


def _new_module(
    precision: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    int8_threshold: float,
    double_quant: bool,
    compute_dtype: torch.dtype,
) -> nn.Module:
    if precision == "int8":
        return _new_linear8(weight, bias, int8_threshold)
    if precision in ("nf4", "fp4"):
        return _new_linear4(weight, bias, precision, double_quant, compute_dtype)
    raise ValueError(f"{precision} is not a bitsandbytes precision")


def _warm_up(module: nn.Module, in_features: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """One forward on zeros: bitsandbytes finishes its lazy set-up (int8 state, CPU layouts) now."""
    import torch

    module.eval()
    with torch.inference_mode():
        module(torch.zeros(1, in_features, dtype=dtype, device=device))
    return module


def build_quantized(
    precision: str,
    master: nn.Linear,
    *,
    int8_threshold: float = 6.0,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A bitsandbytes module for ``precision`` built from ``master`` (left untouched), warmed up."""
    import torch

    dtype = compute_dtype or torch.bfloat16
    module = _new_module(
        precision,
        master.weight.detach(),
        None if master.bias is None else master.bias.detach(),
        int8_threshold=int8_threshold,
        double_quant=double_quant,
        compute_dtype=dtype,
    )
    return _warm_up(module, master.in_features, dtype, master.weight.device)


def restored(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain Linear in ``dtype`` holding the weights a quantized ``module`` computes with.

    4-bit codes in bitsandbytes' plain layout are decoded as its own CPU path decodes them.
    Otherwise (int8, the AVX-512 tiled layout) the module is asked: its output for each unit
    input vector is one column of the weight it applies, whatever kernel this machine uses.
    Bias (if any) is its output for zeros.
    """
    import torch
    from torch import nn

    from tutor.engine.linears import dense_weight

    rows, cols = cast(int, module.out_features), cast(int, module.in_features)
    device = next(module.parameters()).device
    with torch.inference_mode():
        zero = module(torch.zeros(1, cols, dtype=dtype, device=device)).float()
        decoded = dense_weight(module)
        if decoded is not None:
            weight = decoded.float()
        else:
            weight = (module(torch.eye(cols, dtype=dtype, device=device)).float() - zero).T
    plain = nn.Linear(cols, rows, bias=getattr(module, "bias", None) is not None, device=device, dtype=dtype)
    plain.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    if plain.bias is not None:
        plain.bias = nn.Parameter(zero[0].to(dtype), requires_grad=False)
    return plain.eval()


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
            parts.append(_linear8_from(weight.CB[start:stop], weight.SCB[start:stop], bias, threshold))
        else:
            state = weight.quant_state
            cols = state.shape[1]
            if getattr(state, "packing_format_for_cpu", False):
                part_state = _tiled_state(
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
            parts.append(_linear4_from(packed, part_state, bias, precision, double_quant, compute_dtype))
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
            module = _new_module(precision, first.weight.detach(), biases[0], **options)
            return job, None, [_warm_up(module, first.in_features, dtype, device)]
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in parts])
        fused = _new_module(precision, weight, None, **options)
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
        _warm_up(fused, first.in_features, dtype, device)
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
