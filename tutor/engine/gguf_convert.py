"""The fast GGUF conversion: a llama-architecture GGUF (the embedded SmolLM2) into a bf16 folder.

transformers' generic GGUF path re-parses the whole file for the config, again for the tokenizer
and again for the weights, and gguf's ``GGUFReader`` alone takes seconds on this file: it builds
numpy views for each of the ~98,000 vocabulary and merge strings. Here the file is read once,
with a small reader for the parts of the format a model file uses (``read_gguf``), and the
config, tokenizer and weights are built from that one read, reproducing what transformers' own
GGUF loading makes of a llama file (``tests/engine/test_checkpoint.py`` checks it tensor by tensor, field
by field and token by token):

- the config: ``transformers.integrations.ggml.GGUF_CONFIG_MAPPING["llama"]`` (and the tokenizer
  ids), ``tie_word_embeddings`` when the file has no ``output.weight``;
- the weights: dequantized with ``gguf.dequantize`` (vectorised numpy), Q and K rows put back in
  Hugging Face order (the inverse of llama.cpp's permutation, as transformers'
  ``LlamaTensorProcessor`` does), then rounded to bf16;
- the tokenizer: a byte-level BPE from the file's vocabulary and merges, with the control tokens
  as special tokens, as transformers' ``integrations.gguf.gguf_tokenizer_mapping`` builds it.

A file this module does not cover (another architecture, another tokenizer, unknown tensors)
makes ``fast_path_problem`` return a reason, and the caller uses transformers' generic path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedTokenizerFast


class GGUFFormatError(ValueError):
    """The file is not a GGUF file, or is cut short."""


class GGUFVersionError(GGUFFormatError):
    """A GGUF file this reader does not handle (v1, or big-endian): gguf's own reader may."""


# --- reading ------------------------------------------------------------------------------

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


# --- what the fast path covers ------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_REQUIRED_KEYS = (
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types
# llama.cpp pre-tokenizer names for which transformers keeps GPT-2's ByteLevel split (names absent
# from transformers.integrations.gguf.gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS, whose
# import costs half a second); others go to the generic path.
_GPT2_SPLIT_PRE = frozenset({None, "default", "gpt-2", "smollm"})


def hf_name(gguf_name: str, layers: int) -> str | None:
    """The Hugging Face llama parameter name for a GGUF tensor name, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        layer, kind = int(parts[1]), parts[2]
        if layer < layers and kind in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"
    return None


def fast_path_problem(gguf: GGUFFile) -> str | None:
    """Why this module cannot convert ``gguf`` exactly as transformers would (None: it can)."""
    meta = gguf.metadata
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        return f"architecture {architecture!r} (only llama is converted directly)"
    if "mistral" in str(meta.get("general.name", "")).lower():
        return "a Mistral file (transformers loads it as mistral)"
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        return f"metadata lacks {', '.join(missing)}"
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return f"tokenizer {meta.get('tokenizer.ggml.model')!r} (only byte-level BPE is built directly)"
    if meta.get("tokenizer.ggml.pre") not in _GPT2_SPLIT_PRE:
        return f"pre-tokenizer {meta.get('tokenizer.ggml.pre')!r} (may need its own split rule)"
    if "<|endoftext|>" not in meta["tokenizer.ggml.tokens"]:
        return "the vocabulary has no <|endoftext|> (GPT-2's default special token)"
    layers = meta["llama.block_count"]
    unknown = [t.name for t in gguf.tensors if hf_name(t.name, layers) is None]
    if unknown:
        return f"tensors {', '.join(unknown[:3])} have no llama counterpart"
    return None


# --- config -------------------------------------------------------------------------------

# transformers.integrations.ggml.GGUF_CONFIG_MAPPING["llama"] and ["tokenizer"]
_CONFIG_KEYS = {
    "llama.context_length": "max_position_embeddings",
    "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size",
    "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads",
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


def config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The config fields transformers reads from a llama GGUF file."""
    meta = gguf.metadata
    fields: dict[str, Any] = {
        "model_type": "llama",
        "tie_word_embeddings": all(t.name != "output.weight" for t in gguf.tensors),
    }
    if "general.name" in meta:
        fields["_model_name_or_path"] = meta["general.name"]
    for key, name in _CONFIG_KEYS.items():
        if key in meta:
            fields[name] = meta[key]
    fields.setdefault("vocab_size", len(meta["tokenizer.ggml.tokens"]))
    return fields


def build_config(gguf: GGUFFile) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**config_dict(gguf))


# --- tokenizer ----------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte as a printable character (transformers' bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tokenizer(gguf: GGUFFile) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer from the file's vocabulary, as transformers builds it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    meta = gguf.metadata
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # GPT2Tokenizer's default unk/bos/eos, then the file's control tokens (spelled in the byte
    # alphabet: others are llama.cpp mislabels) as special, its user-defined ones as plain added.
    backend.add_special_tokens([AddedToken("<|endoftext|>", normalized=False, special=True)])
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    if control:
        backend.add_special_tokens(control)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and token in vocab
    ]
    if user_defined:
        backend.add_tokens(user_defined)

    def special(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    options: dict[str, Any] = {
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
    }
    for key, name in (
        ("tokenizer.chat_template", "chat_template"),
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ):
        if key in meta:
            options[name] = meta[key]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)


# --- weights ------------------------------------------------------------------------------


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


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (transformers' LlamaTensorProcessor._reverse_permute_weights)."""
    dim = weight.shape[0] // heads // 2
    return weight.reshape(heads, dim, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def bf16_tensor(gguf: GGUFFile, info: TensorInfo) -> tuple[str, torch.Tensor]:
    """``(hf_name, bf16 tensor)`` for one tensor of a file ``fast_path_problem`` accepts."""
    meta = gguf.metadata
    name = hf_name(info.name, meta["llama.block_count"])
    if name is None:
        raise ValueError(f"tensor {info.name!r} has no llama counterpart")
    weight = dequantize_bf16(gguf, info)
    heads = meta["llama.attention.head_count"]
    if name.endswith("self_attn.q_proj.weight"):
        weight = unpermute(weight, heads)
    elif name.endswith("self_attn.k_proj.weight"):
        weight = unpermute(weight, meta.get("llama.attention.head_count_kv", heads))
    return name, weight.contiguous()


def expected_names(config: LlamaConfig) -> set[str]:
    """The parameters a LlamaForCausalLM with ``config`` loads from a checkpoint."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for layer in range(config.num_hidden_layers):
        names.update(f"model.layers.{layer}.{part}.weight" for part in _LAYER_NAMES.values())
    return names
