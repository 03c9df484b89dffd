"""The decoder's Linear slots: how one weight is multiplied on this machine.

A slot is a callable ``x -> x @ W.T (+ b)`` holding its weight in the layout its kernel wants:
oneDNN's pre-packed blocks on CPU (``PackedLinear``), a cast copy (``PlainLinear``), the
model's own module, bf16 master or bitsandbytes (``ModuleLinear``), bitsandbytes' 4-bit CPU
kernel called straight (``Bnb4bitCpuLinear``), a bf16 or 4-bit weight read by the native matvec
where the CPU has no bf16 matmul (``RowsLinear``), LLM.int8 in fewer ops (``LlmInt8Linear``),
or any of them with its input shown to the weight lab and GPTQ (``Tap``).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tutor.engine import native_step

try:  # oneDNN's linear with a pre-packed weight (what torch.compile's CPU backend uses)
    _linear_pointwise: Any = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
    _linear_pointwise = None


class PackedLinear:
    """A Linear whose weight is held in oneDNN's blocked layout (CPU, bf16 or fp32)."""

    __slots__ = ("bias", "out_features", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:

        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        self.bias = None if bias is None else bias.contiguous()
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:

        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]


class PlainLinear:
    """``F.linear`` with a weight of our own (a cast copy, e.g. fp32 on CUDA)."""

    __slots__ = ("bias", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:

        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]


# Above this many rows (a prompt being read), int8-wo's weight is dequantized for one dense
# matmul (``dense_prefill``; int4 has its own threshold, ``int4.dense_rows()``): torch's int8
# kernel is built for decoding's one row, and read a 600-token prompt at half bf16's pace on an
# AVX2 EPYC (the dense fp32 path: 6.6 ms against 13.3 for a 600x576x1536 matmul). Where the CPU
# multiplies bf16 natively the dense matmul is bf16 on the weight rounded to bf16 once: 1.3 ms
# against fp32's 5.2 and the kernel's 3.5 on an AVX-512 EPYC, its output 2.3e-3 (relative RMS)
# from the exact product against 1.7e-3 for the kernel's.
PREFILL_ROWS = 16


def dense_prefill(rows: torch.Tensor, dequantized: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``rows`` (bf16) times the weight ``dequantized(dtype)`` gives, as one dense matmul: fp32
    where bf16 matmul is emulated, else bf16 on the weight rounded to bf16 once. bf16 out."""
    if bf16_matmul_is_emulated():
        return F.linear(rows.float(), dequantized(torch.float32)).to(torch.bfloat16)
    return F.linear(rows, dequantized(torch.bfloat16))


# From this many rows (tokens in one pass) on, a CPU without native bf16 matmul computes a bf16
# linear faster as an fp32 GEMM on upcast copies. Measured on a 2-core AVX2 EPYC, 576 -> 1536:
# 1 row 0.13 ms bf16 vs 0.29 ms upcast; 16 rows 1.8 vs 0.64 ms; 256 rows 26 vs 3.6 ms; the
# 49152-row lm_head over 256 rows 851 vs 223 ms. Decoding (one row) keeps the bf16 kernel.
UPCAST_ROWS = 8
# Up to this many rows a weight on the native matvec (``RowsLinear``) stays there rather than
# going the upcast GEMM's way: it reads the weight once per four rows, where the GEMM first
# makes an fp32 copy of it (and of a 4-bit weight, its bf16 dequantization before that).
# Medians of seven alternated calls on a 2-core AVX2 EPYC, native against upcast GEMM: nf4
# 3072x576 over 49 rows 1.8 vs 6.3 ms, 300 rows 14.4 vs 19.2, 600 rows 21.6 vs 20.9; the four
# shapes of a SmolLM2 layer together cross at about 450 rows. bf16 576x1536 over 32 rows 0.81
# vs 1.02 ms, 64 rows 1.75 vs 1.67. A tutor prompt (250-370 tokens) thus reads its 4-bit
# weights natively.
NATIVE_ROWS_4BIT = 384
NATIVE_ROWS_BF16 = 48
# LLM.int8's whole linear in C++ (``llm_int8_linear``) reads the weight once for up to this many
# rows (a decode step's: one, two with context-aware decoding; LLM_INT8_FEW_ROWS in
# native/llm_int8.h), bitsandbytes' output bit for bit. More rows (a prompt's) go through its
# integer GEMM where the CPU has AVX2, else the Python way (bitsandbytes' float32 matmul).
NATIVE_STEP_ROWS_INT8 = 8


@functools.cache
def bf16_matmul_is_emulated() -> bool:
    """True on CPUs without AVX-512 BF16 / AMX, where oneDNN has no bf16 matmul of its own."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return True


@functools.cache
def int8_matmul_is_emulated() -> bool:
    """True where bitsandbytes multiplies LLM.int8's codes as float32 (its CPU kernel, torch's
    integer matmul, is registered for AVX-512 CPUs only)."""
    return torch.backends.cpu.get_cpu_capability() != "AVX512"


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The bf16 weight ``module`` multiplies by: a master's own, or a 4-bit one dequantized as
    bitsandbytes' CPU path does (to the quant state's dtype); None for others (int8 multiplies
    in integers)."""
    if type(module) is nn.Linear:
        return module.weight
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        state = getattr(module.weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None
        return bnb.functional.dequantize_4bit(module.weight.data, state)
    return None


class ModuleLinear:
    """A module called as is: the bf16 master or a bitsandbytes module (no copy held).

    Many rows in bf16 on a CPU that only emulates bf16 matmul: the same weights (dequantized
    as the module would) and the same rounding of the output to bf16, with the sums done by an
    fp32 GEMM. Only the order of the fp32 sums differs from the module's own call.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        upcast = x.dtype is torch.bfloat16 and x.shape[0] >= UPCAST_ROWS and x.device.type == "cpu"
        if upcast and bf16_matmul_is_emulated() and (weight := dense_weight(self.module)) is not None:
            bias = getattr(self.module, "bias", None)
            out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            return out.to(x.dtype)
        return self.module(x)

    def tensors(self) -> list[torch.Tensor]:
        return []


class Bnb4bitCpuLinear:
    """A bitsandbytes 4-bit module on its AVX-512 BF16 CPU kernel, called straight.

    ``Linear4bit.forward`` reaches that kernel through four Python layers (``matmul_4bit``,
    ``gemv_4bit``, the op's CPU implementation, ctypes), which cast the absmax and read the code
    table's sign again on every call: 120 calls a token, a third of an nf4 token here. This slot
    holds what they compute once (the packed codes, the absmax in bf16, the shapes) and calls
    the same C function on the same bytes, so the output is bit for bit the module's.
    """

    __slots__ = ("absmax", "args", "blocksize", "function", "in_features", "out_features", "weight")

    def __init__(self, module: Any, function: Any) -> None:

        state = module.weight.quant_state
        self.absmax = _absmax(state).to(torch.bfloat16).contiguous()
        self.weight = module.weight.data.contiguous().view(torch.uint8)
        self.out_features, self.in_features = (int(n) for n in state.shape)
        self.blocksize = int(state.blocksize)
        self.function = function
        c = ctypes.c_int64
        self.args = (
            c(self.out_features),
            c(self.in_features),
            ctypes.c_void_p(self.weight.data_ptr()),
            ctypes.c_void_p(self.absmax.data_ptr()),
            c(self.blocksize),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.bfloat16 or not x.is_contiguous():
            x = x.to(torch.bfloat16).contiguous()
        rows = x.shape[0]
        out = torch.empty((rows, self.out_features), dtype=torch.bfloat16)
        n, k, weight, absmax, blocksize = self.args
        # Contiguous rows: the input's row stride is its width k, the output's n (no new
        # ctypes integers for them: this call is 120 of a decoded token's).
        self.function(
            ctypes.c_int64(rows),
            n,
            k,
            ctypes.c_void_p(x.data_ptr()),
            weight,
            absmax,
            ctypes.c_void_p(out.data_ptr()),
            blocksize,
            k,
            n,
        )
        return out

    def tensors(self) -> list[torch.Tensor]:
        return []  # the module's own bytes (the absmax's bf16 copy is a few KiB)


def _absmax(state: Any) -> torch.Tensor:
    """A bitsandbytes 4-bit weight's scale per block, dequantized where double quantization
    quantized it."""
    import bitsandbytes as bnb

    if state.nested:
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


class RowsLinear:
    """A bf16 master or a bitsandbytes 4-bit module on a CPU without bf16 matmul.

    Up to ``max_rows`` rows (decoding, and prompts up to ``NATIVE_ROWS_4BIT`` or
    ``NATIVE_ROWS_BF16`` tokens) go to the native matvec (``native/matvec.cpp``): the weight read
    once per four rows, a 4-bit one as its float32 dequantization (its code's value times the
    block's absmax), the sums in float32, the output rounded to bf16. Here bf16 matmul is
    emulated and bitsandbytes' CPU fallback dequantizes the whole 4-bit weight at every call.
    More rows are computed as ``ModuleLinear`` computes them (an fp32 GEMM on the weight,
    a 4-bit one dequantized to bf16 first).
    """

    __slots__ = (
        "absmax",
        "bias",
        "blocksize",
        "many",
        "max_rows",
        "native",
        "out_features",
        "table",
        "weight",
    )

    def __init__(self, module: Any) -> None:
        self.many = ModuleLinear(module)
        self.native: Any = native_step.loaded()  # loaded: native_rows() said so
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else bias.detach()
        state = getattr(module.weight, "quant_state", None)
        self.absmax: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.blocksize = 0
        if state is None:
            self.weight = module.weight.detach()
            self.out_features = int(self.weight.shape[0])
            self.max_rows = NATIVE_ROWS_BF16
            return
        self.weight = module.weight.data.view(torch.uint8).reshape(-1)
        self.absmax = _absmax(state).float().contiguous()
        self.table = state.code.float().contiguous()
        self.out_features = int(state.shape[0])
        self.blocksize = int(state.blocksize)
        self.max_rows = NATIVE_ROWS_4BIT

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_rows:
            return self.many(x)
        if self.table is None:
            out = self.native.bf16_matvec(rows, self.weight, self.bias)
        else:
            out = self.native.four_bit_matvec(
                rows, self.weight, self.absmax, self.table, self.out_features, self.blocksize, self.bias
            )
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def tensors(self) -> list[torch.Tensor]:
        return []  # the module's own bytes (a 4-bit absmax's float32 copy is a few KiB)


def native_rows(module: Any) -> bool:
    """Whether ``module`` is one ``RowsLinear`` computes here: a bf16 master or a bitsandbytes
    NF4/FP4 module computing in bf16, on a CPU without bf16 matmul, the native kernels loaded."""
    weight = getattr(module, "weight", None)
    if native_step.loaded() is None or weight is None or weight.device.type != "cpu":
        return False
    if not bf16_matmul_is_emulated():
        return False
    if type(module) is nn.Linear:
        return weight.dtype == torch.bfloat16
    state = getattr(weight, "quant_state", None)
    return (
        state is not None
        and not getattr(state, "packing_format_for_cpu", False)
        and state.quant_type in ("nf4", "fp4")
        and state.dtype == torch.bfloat16
        and len(state.shape) == 2
        and int(state.shape[1]) % int(state.blocksize) == 0
        and int(state.blocksize) % 32 == 0
    )


class LlmInt8Linear:
    """A bitsandbytes LLM.int8 module (inference) with its math in fewer passes.

    ``Linear8bitLt.forward`` reaches the int8 matmul through ``MatMul8bitLt`` and three default
    ops, about 35 small ops a call: |x| twice, the outliers zeroed and restored by index, the
    product scaled in three allocations. This slot computes the same quantities in the same
    float order (each row's absmax of the fp16 input without its outliers, codes rounded from
    the same float32 product with the outlier columns zeroed, the int8 matmul through
    bitsandbytes' own op, its dequantization, the outlier columns in 16-bit added back), so the
    output is bit for bit the module's; it holds nothing of its own. Where bitsandbytes only
    emulates its int8 matmul (no AVX-512) the same arithmetic runs in C++ (``llm_int8_linear``)
    with the codes multiplied as integers: a decode step's rows (bit for bit), and with AVX2 a
    prompt's bf16 rows too, whose outlier columns' float32 sums come in another order than
    ATen's addmm (an output may be one bf16 step from the module's).
    """

    __slots__ = (
        "bias",
        "codes",
        "in_features",
        "native",
        "native_rows",
        "out_features",
        "scales",
        "threshold",
    )

    def __init__(self, module: Any) -> None:
        state = module.state
        self.codes, self.scales = state.CB, state.SCB  # (N, K) int8, (N,) float32
        self.out_features, self.in_features = (int(n) for n in self.codes.shape)
        self.threshold = float(state.threshold)
        self.bias = module.bias
        # Without AVX-512 bitsandbytes multiplies int8 codes as float32 copies of them, made at
        # every call: C++ sums the same products in int32 (exact, as the float32 sums are below
        # 2**24).
        self.native: Any = native_step.loaded() if int8_matmul_is_emulated() else None
        self.native_rows = 0  # none: the Python way
        if self.native is not None:
            gemm = self.native.avx2_int8_gemm(self.in_features, self.out_features)
            self.native_rows = sys.maxsize if gemm else NATIVE_STEP_ROWS_INT8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.native_rows and (
            rows.shape[0] <= NATIVE_STEP_ROWS_INT8 or x.dtype is torch.bfloat16
        ):
            # Decoding: the decode step calls it without coming back to Python for each of a
            # token's 120 slots (int8 went from 23.8-26.2 to 46.1-50.7 tok/s on a 2-core AVX2
            # EPYC, three alternated runs). A prompt: its integer GEMM and vectorized steps, where
            # the ATen operations below and bitsandbytes' float32 matmul had a 600-token prompt's
            # first token in 2.62 and 3.11 s, the GEMM in 1.69 and 1.78 (runs alternated).
            return self.native.llm_int8_linear(x, self.codes, self.scales, self.bias, self.threshold)
        half = rows.to(torch.float16)  # bitsandbytes quantizes an fp16 copy
        magnitude = half.abs()
        columns = None  # the outlier columns, if any
        if self.threshold > 0:
            # Every value past the threshold lies in a column whose largest value is past it: the
            # columns first (one reduction), then the mask over those columns alone, not all.
            found = (magnitude.amax(0) >= self.threshold).nonzero().view(-1)
            if found.numel():
                held = magnitude[:, found]
                magnitude[:, found] = held.masked_fill_(held >= self.threshold, 0)
                columns = found
        absmax = magnitude.amax(1).float().unsqueeze(-1)
        scaled = half * (127.0 / absmax)
        if columns is not None:  # held back: computed in 16-bit below
            scaled.index_fill_(1, columns, 0)
        codes = scaled.round_().to(torch.int8)
        product = torch.ops.bitsandbytes.int8_linear_matmul.default(codes, self.codes)
        out = (absmax * self.scales.unsqueeze(0)).mul_(product).mul_(6.200124e-05)
        if self.bias is not None:
            out += self.bias
        out = out.to(rows.dtype)
        if columns is not None:
            weight = self.codes[:, columns] * self.scales.view(-1, 1) * 7.874015718698502e-3
            out = out.addmm(rows[:, columns], weight.to(rows.dtype).t())
        return out.view(*x.shape[:-1], self.out_features)

    def tensors(self) -> list[torch.Tensor]:
        return []  # the module's own


def module_slot(module: Any) -> Slot:
    """The slot for one of the model's modules: bitsandbytes' 4-bit kernel called straight where
    the module runs on it (``Bnb4bitCpuLinear``), the native matvec where the CPU has no bf16
    matmul (``RowsLinear``), LLM.int8 on a CPU in fewer ops (``LlmInt8Linear``), else the module
    as is."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False) and module.bias is None:
        function = _bnb_cpu_4bit_function(state.quant_type)
        if function is not None:
            return Bnb4bitCpuLinear(module, function)
    if native_rows(module):
        return RowsLinear(module)
    int8: Any = getattr(module, "state", None)  # LLM.int8's, once its codes are in place (a first call)
    if (
        getattr(int8, "CB", None) is not None
        and not int8.has_fp16_weights
        and module.weight.device.type == "cpu"
    ):
        return LlmInt8Linear(module)
    return ModuleLinear(module)


def _bnb_cpu_4bit_function(quant_type: str) -> Any:
    """bitsandbytes' C function for 4-bit codes times bf16 on AVX-512 BF16 CPUs, or None."""
    try:
        from bitsandbytes.cextension import lib

        return getattr(lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16", None)
    except (ImportError, RuntimeError):  # pragma: no cover - a build without its CPU library
        return None


class Tap:
    """A slot that shows its input to ``see(names, x)`` before computing: ``names`` are the
    model's Linear modules it computes (the weight lab's inputs, GPTQ's calibration). ``see`` may
    raise to end the pass there."""

    __slots__ = ("names", "see", "slot")

    def __init__(self, slot: Slot, names: tuple[str, ...], see: See) -> None:
        self.slot, self.names, self.see = slot, names, see

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.see(self.names, x)
        return self.slot(x)

    def tensors(self) -> list[torch.Tensor]:
        return []


Slot = PackedLinear | PlainLinear | ModuleLinear | Bnb4bitCpuLinear | RowsLinear | LlmInt8Linear | Tap
See = Callable[[tuple[str, ...], torch.Tensor], None]


def mkldnn_linear_works(dtype: torch.dtype) -> bool:
    """True when oneDNN packed linears run here and agree with ``F.linear`` bit for bit."""

    try:
        if _linear_pointwise is None or not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(96, 64, generator=gen) * 0.1).to(dtype)
        x = torch.randn(3, 64, generator=gen).to(dtype)
        with torch.inference_mode():
            return bool(torch.equal(PackedLinear(w, None)(x), F.linear(x, w)))
    except Exception:
        return False
