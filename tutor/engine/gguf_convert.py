"""The fast GGUF conversion: a llama-architecture GGUF (the embedded SmolLM2) into a bf16 folder.

transformers' generic GGUF path re-parses the whole file for the config, again for the tokenizer
and again for the weights, and gguf's ``GGUFReader`` alone takes seconds on this file. Here the
file is read once (``tutor.engine.gguf_reader``), and the config, tokenizer and weights are built
from that one read, reproducing what transformers' own GGUF loading makes of a llama file
(``tests/engine/test_checkpoint.py`` checks it tensor by tensor, field by field and token by token):

- the config (here): ``transformers.integrations.ggml.GGUF_CONFIG_MAPPING["llama"]`` (and the
  tokenizer ids), ``tie_word_embeddings`` when the file has no ``output.weight``;
- the weights (here, by name): dequantized and rounded to bf16 (``tutor.engine.gguf_dequantize``),
  Q and K rows put back in Hugging Face order (the inverse of llama.cpp's permutation, as
  transformers' ``LlamaTensorProcessor`` does);
- the tokenizer (``tutor.engine.gguf_tokenizer``): a byte-level BPE from the file's vocabulary
  and merges.

A file the fast path does not cover (another architecture, another tokenizer, unknown tensors)
makes ``fast_path_problem`` return a reason, and the caller uses transformers' generic path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tutor.engine.gguf_dequantize import dequantize_bf16
from tutor.engine.gguf_reader import GGUFFile, TensorInfo

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig


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
    """Why the fast path cannot convert ``gguf`` exactly as transformers would (None: it can)."""
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


# --- weights ------------------------------------------------------------------------------


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
