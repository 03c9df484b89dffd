"""bitsandbytes modules (int8, nf4, fp4) built from bf16 weights, and plain Linears back from them.

int8 follows ``Int8Params._quantize`` (fp16 rows, absmax per row via
``bitsandbytes.functional.int8_vectorwise_quant``). 4-bit on CUDA uses bitsandbytes' own
``quantize_4bit`` kernel, on CPU the codes of ``tutor.engine.bnb_codes``.

Each module is warmed up with one forward pass on zeros, so bitsandbytes' lazy first-call work
happens while preparing a precision and a broken kernel shows up as a failed switch, not as a
failed reply.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, cast

from tutor.engine.bnb_codes import BLOCKSIZE, CPU_BLOCK_N, quantize_4bit_cpu, quantize_4bit_cpu_tiled

if TYPE_CHECKING:
    import torch
    from torch import nn


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
    return linear8_from(cb, scb, bias, threshold)


def linear8_from(
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
        state = tiled_state(
            absmax.reshape(rows, cols // BLOCKSIZE).T.to(torch.bfloat16).contiguous(),
            weight.shape,
            weight.dtype,
            code,
            quant_type,
            double_quant,
        )
    elif weight.device.type == "cpu" and weight.numel() % BLOCKSIZE == 0:
        packed, absmax = quantize_4bit_cpu(weight, quant_type)
        nested: dict[str, Any] = {}
        if double_quant:  # as bitsandbytes.functional.quantize_4bit(compress_statistics=True)
            offset = absmax.mean()
            absmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
            nested = {"offset": offset, "state2": state2}
        state = QuantState(
            absmax=absmax,
            shape=weight.shape,
            dtype=weight.dtype,
            blocksize=BLOCKSIZE,
            code=code,
            quant_type=quant_type,
            **nested,
        )
    else:
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
        )
    return linear4_from(packed, state, bias, quant_type, double_quant, compute_dtype)


def tiled_state(
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


def linear4_from(
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


def new_module(
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


def warm_up(module: nn.Module, in_features: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
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
    module = new_module(
        precision,
        master.weight.detach(),
        None if master.bias is None else master.bias.detach(),
        int8_threshold=int8_threshold,
        double_quant=double_quant,
        compute_dtype=dtype,
    )
    return warm_up(module, master.in_features, dtype, master.weight.device)


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
