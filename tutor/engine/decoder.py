"""The decode loops: a lean forward pass for Llama-architecture models, and a generic fallback.

``FastDecoder`` re-implements ``LlamaForCausalLM.forward`` for inference with the same
operations in the same order (RMSNorm in float32, rotary embedding, SDPA with grouped KV heads,
SiLU MLP), so its greedy tokens equal ``model.generate``'s, while dropping what a general
forward pays on every step: mask construction, cache bookkeeping, output records, hooks. On
top of that:

* a static KV buffer per reply (allocated once, written in place, attention reads a view);
* on CPU, bf16/fp32 Linear weights re-laid out once for oneDNN (``mkldnn._reorder_linear_weight``
  + ``_linear_pointwise``: about 2x faster per matmul here, same results bit for bit), with
  q/k/v and gate/up fused into one matmul each;
* quantized precisions call the installed bitsandbytes modules directly.

``GenericSession`` runs any causal LM through ``model(...)`` with a transformers cache
(``StaticCache`` on CUDA), for architectures the fast path does not cover or when asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# This module is imported only once a model is being loaded, so torch at the top is fine here.
import torch
import torch.nn.functional as F
from torch import nn

try:  # oneDNN's linear with a pre-packed weight (what torch.compile's CPU backend uses)
    _linear_pointwise: Any = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
    _linear_pointwise = None
FAST_ARCHITECTURES = ("LlamaForCausalLM",)
STATIC_ROPE = ("default", "linear", "llama3")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fast_path_problem(model: Any) -> str | None:
    """Why the fast decoder cannot run ``model`` (None when it can)."""
    config = model.config
    if type(model).__name__ not in FAST_ARCHITECTURES:
        return f"{type(model).__name__} is not a Llama-architecture model"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act} is not silu"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        return f"rotary embedding type {rope_type} changes with the sequence length"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    return None


# --------------------------------------------------------------------------- linear slots


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


# From this many rows (tokens in one pass) on, a CPU without native bf16 matmul computes a bf16
# linear faster as an fp32 GEMM on upcast copies. Measured on a 2-core AVX2 EPYC, 576 -> 1536:
# 1 row 0.13 ms bf16 vs 0.29 ms upcast; 16 rows 1.8 vs 0.64 ms; 256 rows 26 vs 3.6 ms; the
# 49152-row lm_head over 256 rows 851 vs 223 ms. Decoding (one row) keeps the bf16 kernel.
UPCAST_ROWS = 8


@functools.cache
def bf16_matmul_is_emulated() -> bool:
    """True on CPUs without AVX-512 BF16 / AMX, where oneDNN has no bf16 matmul of its own."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return True


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


Slot = PackedLinear | PlainLinear | ModuleLinear | Tap
See = Callable[[tuple[str, ...], torch.Tensor], None]


@dataclass
class LayerWeights:
    q: Slot | None
    k: Slot | None
    v: Slot | None
    qkv: Slot | None  # fused q|k|v when available
    o: Slot
    gate: Slot | None
    up: Slot | None
    gate_up: Slot | None  # fused gate|up when available
    down: Slot
    ln1: torch.Tensor
    ln2: torch.Tensor


@dataclass
class DecoderWeights:
    """Everything the fast decoder computes with at one precision."""

    precision: str
    act_dtype: torch.dtype
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: Slot
    copies: list[torch.Tensor] = field(default_factory=list)  # tensors held only for this precision

    @property
    def copy_bytes(self) -> int:
        from tutor.engine.memory import tensor_bytes

        return tensor_bytes(self.copies)


@dataclass
class KVCache:
    """Keys and values for every layer: ``(layers, 2, batch, kv_heads, max_len, head_dim)``."""

    data: torch.Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return int(self.data.shape[4])


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


class FastDecoder:
    """A lean inference forward over a Llama model's own modules and weights."""

    def __init__(self, model: Any, device: torch.device) -> None:

        self.model = model
        self.device = device
        config = model.config
        self.config = config
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.hidden = int(config.hidden_size)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.scaling = float(model.model.layers[0].self_attn.scaling)
        self.max_positions = int(getattr(config, "max_position_embeddings", 4096))
        self.layers = list(model.model.layers)
        self.embed = model.model.embed_tokens.weight
        self.tied = model.lm_head.weight.data_ptr() == self.embed.data_ptr()
        self.fuse = True  # fuse q|k|v and gate|up into one packed matmul each
        self._packed_ok: dict[torch.dtype, bool] = {}
        self._rope: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._heads: dict[torch.dtype, Slot] = {}

    # ----------------------------------------------------------------------- weights

    def can_pack(self, dtype: torch.dtype) -> bool:
        if self.device.type != "cpu":
            return False
        if dtype not in self._packed_ok:
            self._packed_ok[dtype] = mkldnn_linear_works(dtype)
        return self._packed_ok[dtype]

    def head_for(self, dtype: torch.dtype) -> tuple[Slot, bool]:
        """The lm_head computing in ``dtype`` and whether it is shared.

        In the weights' own dtype it is built once and shared by every precision computing in
        that dtype (bf16, int8, nf4, fp4); in another dtype (fp32) it belongs to that
        precision alone, so dropping the precision frees it.
        """

        head = self._heads.get(dtype)
        if head is not None:
            return head, True
        weight = self.model.lm_head.weight.detach()
        bias = getattr(self.model.lm_head, "bias", None)
        with torch.no_grad():
            if self.can_pack(dtype):
                head = PackedLinear(weight.to(dtype), None if bias is None else bias.to(dtype))
            elif weight.dtype == dtype:
                head = ModuleLinear(self.model.lm_head)
            else:
                head = PlainLinear(weight.to(dtype), None if bias is None else bias.to(dtype))
        shared = dtype == weight.dtype
        if shared:
            self._heads[dtype] = head
        return head, shared

    def head_bytes(self) -> int:
        """Bytes of the shared lm_head copies (kernel layout)."""
        from tutor.engine.memory import tensor_bytes

        return tensor_bytes(t for head in self._heads.values() for t in head.tensors())

    def fusion_groups(self) -> list[tuple[str, ...]]:
        """Modules reading the same input, computed as one matmul when possible: q|k|v, gate|up."""
        groups: list[tuple[str, ...]] = []
        for i in range(self.n_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            groups.append((f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"))
            groups.append((f"{mlp}.gate_proj", f"{mlp}.up_proj"))
        return groups

    @staticmethod
    def linear_names(layer: int) -> dict[str, str]:
        """``q_proj`` -> ``model.layers.{layer}.self_attn.q_proj`` and so on, for each Linear."""
        return {
            n: f"model.layers.{layer}.{'self_attn' if n in LINEAR_NAMES[:4] else 'mlp'}.{n}"
            for n in LINEAR_NAMES
        }

    def tapped(self, weights: DecoderWeights, see: See) -> DecoderWeights:
        """``weights`` with each decoder Linear slot showing its input to ``see`` (a fused slot
        once, with the names of all the modules it computes)."""
        from dataclasses import replace

        parts: dict[str, tuple[str, ...]] = {
            "q": ("q_proj",),
            "k": ("k_proj",),
            "v": ("v_proj",),
            "qkv": ("q_proj", "k_proj", "v_proj"),
            "o": ("o_proj",),
            "gate": ("gate_proj",),
            "up": ("up_proj",),
            "gate_up": ("gate_proj", "up_proj"),
            "down": ("down_proj",),
        }
        layers = []
        for i, lw in enumerate(weights.layers):
            full = self.linear_names(i)
            taps: dict[str, Any] = {
                field: Tap(slot, tuple(full[n] for n in names), see)
                for field, names in parts.items()
                if (slot := getattr(lw, field)) is not None
            }
            layers.append(replace(lw, **taps))
        return replace(weights, layers=layers, copies=[])

    def build_weights(
        self,
        precision: str,
        linears: Mapping[str, nn.Module],
        act_dtype: torch.dtype,
        *,
        fused: Mapping[tuple[str, ...], nn.Module] | None = None,
    ) -> DecoderWeights:
        """Weights for ``precision`` from ``linears`` (module name -> master or bitsandbytes module).

        Masters (``nn.Linear``) are packed / cast to ``act_dtype`` where that helps (q|k|v and
        gate|up stacked into one packed matmul each); ``fused`` supplies ready modules for such
        groups (bitsandbytes); any other module is called as is.
        """

        copies: list[torch.Tensor] = []
        pack = self.can_pack(act_dtype)

        def plain_linear(module: Any) -> bool:
            return type(module) is nn.Linear

        def weight_of(module: Any) -> torch.Tensor:
            return module.weight.detach().to(act_dtype)

        def bias_of(module: Any) -> torch.Tensor | None:
            bias = getattr(module, "bias", None)
            return None if bias is None else bias.detach().to(act_dtype)

        def single(module: Any) -> Slot:
            if plain_linear(module):
                if pack:
                    slot = PackedLinear(weight_of(module), bias_of(module))
                    copies.extend(slot.tensors())
                    return slot
                if module.weight.dtype != act_dtype:
                    plain = PlainLinear(weight_of(module), bias_of(module))
                    copies.extend(plain.tensors())
                    return plain
            return ModuleLinear(module)

        ready = fused or {}

        def fuse(names: tuple[str, ...]) -> Slot | None:
            if not self.fuse:
                return None
            if names in ready:
                return ModuleLinear(ready[names])
            modules: list[Any] = [linears[n] for n in names]
            if not pack or not all(plain_linear(m) for m in modules):
                return None
            weight = torch.cat([weight_of(m) for m in modules])
            biases = [bias_of(m) for m in modules]
            bias = (
                None
                if all(b is None for b in biases)
                else torch.cat(
                    [
                        b if b is not None else torch.zeros(m.out_features, dtype=act_dtype)
                        for b, m in zip(biases, modules, strict=True)
                    ]
                )
            )
            slot = PackedLinear(weight, bias)
            copies.extend(slot.tensors())
            return slot

        layers: list[LayerWeights] = []
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                full = self.linear_names(i)
                get = {n: linears[full[n]] for n in LINEAR_NAMES}
                qkv = fuse((full["q_proj"], full["k_proj"], full["v_proj"]))
                gate_up = fuse((full["gate_proj"], full["up_proj"]))
                ln1 = layer.input_layernorm.weight.detach()
                ln2 = layer.post_attention_layernorm.weight.detach()
                if ln1.dtype != act_dtype:
                    ln1, ln2 = ln1.to(act_dtype), ln2.to(act_dtype)
                    copies.extend([ln1, ln2])
                layers.append(
                    LayerWeights(
                        q=None if qkv else single(get["q_proj"]),
                        k=None if qkv else single(get["k_proj"]),
                        v=None if qkv else single(get["v_proj"]),
                        qkv=qkv,
                        o=single(get["o_proj"]),
                        gate=None if gate_up else single(get["gate_proj"]),
                        up=None if gate_up else single(get["up_proj"]),
                        gate_up=gate_up,
                        down=single(get["down_proj"]),
                        ln1=ln1,
                        ln2=ln2,
                    )
                )
            norm = self.model.model.norm.weight.detach()
            if norm.dtype != act_dtype:
                norm = norm.to(act_dtype)
                copies.append(norm)
        head, shared = self.head_for(act_dtype)
        if not shared:
            copies.extend(head.tensors())
        return DecoderWeights(precision, act_dtype, layers, norm, head, copies)

    # ----------------------------------------------------------------------- forward

    def new_cache(self, max_len: int, act_dtype: torch.dtype, batch: int = 1) -> KVCache:

        shape = (self.n_layers, 2, batch, self.n_kv, max_len, self.head_dim)
        return KVCache(torch.empty(shape, dtype=act_dtype, device=self.device))

    def _rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, each ``(max_len, head_dim)``.

        ``rotate_half(x) * sin == roll(x, head_dim / 2) * sin_signed`` exactly (only signs move).
        """

        tables = self._rope.get(dtype)
        if tables is None or tables[0].shape[0] < length:
            size = max(length, min(self.max_positions, 2048))
            positions = torch.arange(size, device=self.device)[None]
            probe = torch.zeros(1, dtype=dtype, device=self.device)
            with torch.no_grad():
                cos, sin = self.model.model.rotary_emb(probe, positions)
            cos, sin = cos[0], sin[0]
            half = sin.shape[-1] // 2
            sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            tables = (cos.contiguous(), sin_signed.contiguous())
            self._rope[dtype] = tables
        return tables

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:

        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + eps)
        return weight * h.to(dtype)

    def forward(
        self,
        weights: DecoderWeights,
        ids: torch.Tensor,
        cache: KVCache | None,
        *,
        last_only: bool = True,
        keep_from: int = 0,
        pad: torch.Tensor | None = None,
        rope_from: int = 0,
    ) -> torch.Tensor:
        """Logits for ``ids`` (``(batch, T)``), continuing ``cache`` (or without one).

        ``pad`` (one count per row) marks that many leading positions of each row as padding
        that no other position attends to: rows of different prompt lengths, right-aligned to one
        length, decode as one batch. RoPE scores depend only on the distance
        between two positions, so a row shifted right by its padding gives the same logits as
        alone. ``rope_from`` rotates as if the cache's first slot were that position (a row
        prefilled on its own into a cache view that starts after its padding).

        Returns ``(batch, vocab)`` for the last position when ``last_only``, else
        ``(batch, T - keep_from, vocab)`` for positions ``keep_from`` on; in the precision's
        activation dtype, as the transformers model would.
        """

        batch, steps = ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None and steps > 1 and start > 0:
            raise ValueError("the fast decoder prefills from position 0 only")
        end = start + steps
        if cache is not None and end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {end} needed")
        act = weights.act_dtype
        heads, kv_heads, dim = self.n_heads, self.n_kv, self.head_dim
        q_width = heads * dim
        cos_table, sin_table = self._rope_tables(rope_from + end, act)
        cos = cos_table[rope_from + start : rope_from + end].view(1, steps, 1, dim)
        sin = sin_table[rope_from + start : rope_from + end].view(1, steps, 1, dim)
        x = F.embedding(ids, self.embed).to(act).view(batch * steps, self.hidden)
        causal = steps > 1
        mask = None if pad is None else _pad_mask(pad, start, end)
        gqa = heads != kv_heads
        for index, lw in enumerate(weights.layers):
            h = self._rms(x, lw.ln1, self.eps)
            if lw.qkv is not None:
                qkv = lw.qkv(h)
            else:
                assert lw.q is not None and lw.k is not None and lw.v is not None
                qkv = torch.cat([lw.q(h), lw.k(h), lw.v(h)], dim=-1)
            qkv = qkv.view(batch, steps, heads + 2 * kv_heads, dim)
            qk = qkv[:, :, : heads + kv_heads]
            qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
            if cache is not None:
                layer_cache = cache.data[index]
                layer_cache[0, :, :, start:end] = k
                layer_cache[1, :, :, start:end] = v
                k = layer_cache[0, :, :, :end]
                v = layer_cache[1, :, :, :end]
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.scaling, enable_gqa=gqa
            )
            attn = attn.transpose(1, 2).reshape(batch * steps, q_width)
            x = x + lw.o(attn)
            h = self._rms(x, lw.ln2, self.eps)
            if lw.gate_up is not None:
                gate_up = lw.gate_up(h)
                gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            else:
                assert lw.gate is not None and lw.up is not None
                gate, up = lw.gate(h), lw.up(h)
            x = x + lw.down(F.silu(gate) * up)
        if cache is not None:
            cache.length = end
        if last_only:
            x = x.view(batch, steps, self.hidden)[:, -1]
        elif keep_from:
            x = x.view(batch, steps, self.hidden)[:, keep_from:].reshape(-1, self.hidden)
        x = self._rms(x, weights.norm, self.eps)
        logits = weights.head(x)
        return logits if last_only else logits.view(batch, steps - keep_from, -1)


def _pad_mask(pad: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``(batch, 1, end - start, end)``: causal, blind to each row's padding (a padding position
    sees only itself, so a padding query's unused output stays finite)."""
    keys = torch.arange(end, device=pad.device)
    queries = torch.arange(start, end, device=pad.device)
    allowed = (keys[None, None, :] <= queries[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
    return (allowed | (keys[None, None, :] == queries[None, :, None]))[:, None]


def mix_contrast(logits: torch.Tensor, plain: torch.Tensor, alpha: float) -> torch.Tensor:
    """Context-aware decoding (Shi et al., 2023): ``(1 + alpha) * with - alpha * without``, in fp32."""
    return (1 + alpha) * logits.float() - alpha * plain.float()


class FastContrastSession:
    """Context-aware decoding on the fast decoder: the prompt with the passages and the one
    without them decode as one batch of two (one pass per token).

    Each prompt is prefilled on its own (no pass over padding), into its row of one KV cache,
    the shorter one right-aligned after zeroed padding slots that the mask hides."""

    kind = "fast+cad"

    def __init__(
        self, decoder: FastDecoder, weights: DecoderWeights, max_len: int, plain_ids: list[int], alpha: float
    ) -> None:
        self.decoder, self.weights, self.alpha = decoder, weights, alpha
        self.plain_ids = plain_ids
        self.max_len = max_len
        self.cache: KVCache | None = None
        self.pad: torch.Tensor | None = None
        self._tokens = torch.zeros(2, 1, dtype=torch.long, device=decoder.device)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        rows = (ids, self.plain_ids)
        length = max(len(row) for row in rows)
        device = self.decoder.device
        pads = [length - len(row) for row in rows]
        self.pad = torch.tensor(pads, device=device)
        extra = max(0, len(self.plain_ids) - len(ids))  # the cache is sized for the longer prompt
        self.cache = self.decoder.new_cache(self.max_len + extra, self.weights.act_dtype, batch=2)
        logits = []
        for index, (row, pad) in enumerate(zip(rows, pads, strict=True)):
            self.cache.data[:, :, index, :, :pad].zero_()  # hidden by the mask; zeros, not garbage
            view = KVCache(self.cache.data[:, :, index : index + 1, :, pad:])
            tensor = torch.tensor([row], dtype=torch.long, device=device)
            logits.append(self.decoder.forward(self.weights, tensor, view, rope_from=pad)[0])
        self.cache.length = length
        return mix_contrast(logits[0], logits[1], self.alpha)

    def step(self, token: int) -> torch.Tensor:
        self._tokens.fill_(token)
        logits = self.decoder.forward(self.weights, self._tokens, self.cache, pad=self.pad)
        return mix_contrast(logits[0], logits[1], self.alpha)


class PairContrastSession:
    """Context-aware decoding on any decoder: two sessions, two passes per token."""

    kind = "cad"

    def __init__(self, with_passages: Any, without: Any, plain_ids: list[int], alpha: float) -> None:
        self.sessions, self.plain_ids, self.alpha = (with_passages, without), plain_ids, alpha

    def prefill(self, ids: list[int]) -> torch.Tensor:
        first, second = self.sessions
        return mix_contrast(first.prefill(ids), second.prefill(self.plain_ids), self.alpha)

    def step(self, token: int) -> torch.Tensor:
        first, second = self.sessions
        return mix_contrast(first.step(token), second.step(token), self.alpha)


class FastSession:
    """One reply's worth of decoding with the fast decoder."""

    kind = "fast"

    def __init__(self, decoder: FastDecoder, weights: DecoderWeights, max_len: int) -> None:
        self.decoder = decoder
        self.weights = weights
        self.cache = decoder.new_cache(max_len, weights.act_dtype)
        self._token = torch_long_scalar(decoder.device)

    def prefill(self, ids: list[int]) -> torch.Tensor:

        tensor = torch.tensor([ids], dtype=torch.long, device=self.decoder.device)
        return self.decoder.forward(self.weights, tensor, self.cache)[0]

    def step(self, token: int) -> torch.Tensor:
        self._token.fill_(token)
        return self.decoder.forward(self.weights, self._token, self.cache)[0]


def torch_long_scalar(device: torch.device) -> torch.Tensor:

    return torch.zeros((1, 1), dtype=torch.long, device=device)


class GenericSession:
    """One reply decoded through ``model(...)`` with a transformers KV cache."""

    kind = "generic"

    def __init__(self, model: Any, device: torch.device, max_len: int, static: bool) -> None:
        from transformers import DynamicCache, StaticCache

        self.model = model
        self.device = device
        self.cache: Any = (
            StaticCache(config=model.config, max_cache_len=max_len)
            if static
            else DynamicCache(config=model.config)
        )
        self.position = 0

    def _run(self, ids: list[int]) -> torch.Tensor:

        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(self.position, self.position + len(ids), device=self.device)[None]
        out = self.model(
            input_ids=tensor,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.position += len(ids)
        return out.logits[0, -1]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        return self._run(ids)

    def step(self, token: int) -> torch.Tensor:
        return self._run([token])
