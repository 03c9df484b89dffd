"""A small GGUF reader: a file's metadata and tensor table in one pass, the tensors' bytes
memory-mapped and read on demand.

gguf's own ``GGUFReader`` takes seconds on the embedded model's file (it builds numpy views for
each of the ~98,000 vocabulary and merge strings); this reads only the parts of the format a
model file uses, v2 and v3, little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class GGUFFormatError(ValueError):
    """The file is not a GGUF file, or is cut short."""


class GGUFVersionError(GGUFFormatError):
    """A GGUF file this reader does not handle (v1, or big-endian): gguf's own reader may."""


_GGUF_MAGIC = b"GGUF"
# fixed-size metadata value types: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64 (8 is a string, 9 an array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its name, shape (torch order: rows first), ggml type and bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata and tensor table; tensor bytes are read (memory-mapped) on demand."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data: np.ndarray  # the whole file, memory-mapped as uint8

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as stored (a read-only view of the mapped file)."""
        return np.asarray(self.data[info.offset : info.offset + info.nbytes])


class _Cursor:
    """Reads GGUF's little-endian values one after another from a buffer."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buffer, self.pos)
        start = self.pos + 8
        self.pos = start + length
        if self.pos > len(self.buffer):
            raise GGUFFormatError("a string runs past the end of the file")
        return bytes(self.buffer[start : self.pos]).decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type in _SCALARS:
                dtype = np.dtype("<" + _SCALARS[item_type])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buffer):
                    raise GGUFFormatError("an array runs past the end of the file")
                items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos = end
                return items.tolist()
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            return [self.value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {value_type}")


def read_gguf(path: Path | str) -> GGUFFile:
    """Parse a GGUF (v2 or v3) file's metadata and tensor table. Raises GGUFFormatError."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except ValueError as exc:  # an empty file cannot be mapped
        raise GGUFFormatError("the file is empty") from exc
    cursor = _Cursor(data.data)  # a memoryview of the mapped bytes
    try:
        if bytes(cursor.buffer[:4]) != _GGUF_MAGIC:
            raise GGUFFormatError("it does not start with the GGUF magic bytes")
        cursor.pos = 4
        version, tensor_count, kv_count = cursor.unpack("IQQ")
        if version not in (2, 3):
            raise GGUFVersionError(f"GGUF version {version} (or byte order) is not supported here")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            (value_type,) = cursor.unpack("I")
            metadata[key] = cursor.value(value_type)
        table = []
        for _ in range(tensor_count):
            name = cursor.string()
            (n_dims,) = cursor.unpack("I")
            if n_dims > 8:  # ggml tensors have at most 4
                raise GGUFFormatError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = cursor.unpack(f"{n_dims}Q")
            ggml_type, offset = cursor.unpack("IQ")
            table.append((name, tuple(reversed(dims)), ggml_type, offset))
    except (struct.error, UnicodeDecodeError) as exc:
        raise GGUFFormatError(f"its metadata is cut short or garbled ({exc})") from exc
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFFormatError(f"bad general.alignment {alignment!r}")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in table:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as exc:
            raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {ggml_type}") from exc
        elements = int(np.prod(shape, dtype=np.int64))
        if shape and shape[-1] % block:
            raise GGUFFormatError(f"tensor {name!r} rows of {shape[-1]} are not whole blocks of {block}")
        nbytes = elements // block * type_size
        start = data_start + offset
        if start + nbytes > len(data):
            raise GGUFFormatError(f"the file is truncated (tensor {name!r} runs past its end)")
        tensors.append(TensorInfo(name, shape, ggml_type, start, nbytes))
    return GGUFFile(path, metadata, tuple(tensors), data)
