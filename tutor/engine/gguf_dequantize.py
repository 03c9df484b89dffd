"""A GGUF tensor's values: dequantized with gguf's vectorised numpy dequantizers, as float32 or
rounded to bf16 (to nearest even, as ``tensor.to(torch.bfloat16)``), in the file's row order."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tutor.engine.gguf_reader import GGUFFile, TensorInfo

if TYPE_CHECKING:
    import torch

# Tensors are dequantized and rounded this many values at a time: temporaries that stay in cache
# instead of several full-size float32 copies (measured ~40% less CPU time than whole tensors).
_CHUNK_VALUES = 1 << 18


def dequantize(gguf: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The tensor as float32, in its torch shape (gguf's vectorised numpy dequantizers)."""
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape
    from gguf import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    values = gguf_dequantize(gguf.raw(info).reshape(quant_shape_to_byte_shape(info.shape, qtype)), qtype)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only mapped file
        values = values.copy()
    return values.reshape(info.shape)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the bits of the nearest bf16 (ties to even), as ``tensor.to(torch.bfloat16)``.

    Done on the bits in numpy: single-threaded and cheap, where torch's conversion (with its
    intra-op threads) measured about three times the CPU time on a busy 2-core machine. Values
    holding inf or nan (where the bit trick and torch could differ) go through torch.
    """
    if not np.isfinite(values).all():
        import torch

        exact = torch.from_numpy(np.array(values, dtype=np.float32)).to(torch.bfloat16)
        return exact.view(torch.int16).numpy().view(np.uint16)
    bits = values.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # no overflow: finite values are below 0xFF800000
    rounded >>= 16
    return rounded.astype(np.uint16)


def to_bf16(values: np.ndarray) -> torch.Tensor:
    """A float32 array as a bf16 tensor, rounded to nearest even."""
    import torch

    return torch.from_numpy(_bf16_bits(np.ascontiguousarray(values, dtype=np.float32))).view(torch.bfloat16)


def dequantize_bf16(gguf: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """The tensor dequantized (float32, gguf's dequantizers) and rounded to bf16, a chunk of rows
    at a time; in the file's row order, in its torch shape."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    columns = info.shape[-1]
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    raw = gguf.raw(info).reshape(rows, -1)  # one row of blocks (or values) per tensor row
    out = np.empty((rows, columns), dtype=np.uint16)
    step = max(1, _CHUNK_VALUES // columns)
    for start in range(0, rows, step):
        values = gguf_dequantize(raw[start : start + step], qtype)
        out[start : start + step] = _bf16_bits(values.reshape(-1, columns))
    return torch.from_numpy(out).view(torch.bfloat16).reshape(info.shape)
