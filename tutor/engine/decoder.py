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

The Linear slots are :mod:`tutor.engine.linears`, the weights per precision they make up
:mod:`tutor.engine.decoder_weights`; the sessions that decode a reply on it are
:mod:`tutor.engine.sessions`, whose ``GenericSession`` runs any causal LM through
``model(...)`` with a transformers cache (``StaticCache`` on CUDA), for architectures the fast
path does not cover or when asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# This module is imported only once a model is being loaded, so torch at the top is fine here.
import torch
import torch.nn.functional as F
from torch import nn

from tutor.engine.attention import PROMPT_CHUNK, one_query_attention, pad_mask
from tutor.engine.decoder_weights import LINEAR_NAMES, DecoderWeights, LayerWeights, linear_names
from tutor.engine.linears import (
    PackedLinear,
    PlainLinear,
    Slot,
    bf16_matmul_is_emulated,
    mkldnn_linear_works,
    module_slot,
)

FAST_ARCHITECTURES = ("LlamaForCausalLM",)
# Raised when the fast decoder's arithmetic changes (``Engine.arithmetic``, in the Lab's cache
# keys). 2: a prompt's attention in native/prefill.cpp; 3: a decode step's in
# native/decode_attention.cpp; 4: decoding's bf16 and 4-bit matmuls in native/matvec.cpp where
# the CPU has no bf16 matmul; 5: bf16's RMSNorm and silu(gate) * up in native/layer_math.cpp,
# and 4-bit matvecs in fixed point; 6: prompts of up to 384 tokens (bf16: 48) on the native
# matvec too where the CPU has no bf16 matmul; 7: LLM.int8's prompts through the integer GEMM of
# native/llm_int8.cpp where bitsandbytes emulates its int8 matmul (outlier columns summed in
# another order).
ARITHMETIC_VERSION = 7
STATIC_ROPE = ("default", "linear", "llama3")


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


@dataclass
class KVCache:
    """Keys and values for every layer: ``(layers, 2, batch, kv_heads, max_len, head_dim)``."""

    data: torch.Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return int(self.data.shape[4])


@dataclass
class Residuals:
    """The residual stream entering each decoder layer in one pass over some ids (``entering``,
    recorded by a pass given these empty), so that a later pass over the same ids whose layers
    before ``first`` are the same ones can start at layer ``first``: same inputs, same kernels,
    the same stream, bit for bit, without computing it again."""

    entering: list[torch.Tensor] = field(default_factory=list)
    first: int = 0


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
        self.graphs = device.type == "cuda"  # replay decode steps as CUDA graphs (tutor.engine.graphs)
        # The native decode step and prompt attention (tutor.engine.native_step), once loaded on
        # a CPU; ``use_native`` False runs the Python loop (which still calls the native decode
        # attention) and SDPA for a prompt instead (a benchmark's contrast).
        self.native: Any = None
        self.use_native = True
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
                head = module_slot(self.model.lm_head)
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

    def build_weights(
        self,
        precision: str,
        linears: Mapping[str, nn.Module],
        act_dtype: torch.dtype,
        *,
        fused: Mapping[tuple[str, ...], nn.Module] | None = None,
        copies_allowed: bool = True,
    ) -> DecoderWeights:
        """Weights for ``precision`` from ``linears`` (module name -> master or bitsandbytes module).

        Masters (``nn.Linear``) are packed / cast to ``act_dtype`` where that helps (q|k|v and
        gate|up stacked into one packed matmul each); ``fused`` supplies ready modules for such
        groups (bitsandbytes); any other module is called as is. Without ``copies_allowed``
        plain Linears are called as they are, in their own storage (no packed copy).
        """

        copies: list[torch.Tensor] = []
        pack = copies_allowed and self.can_pack(act_dtype)

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
            return module_slot(module)

        ready = fused or {}

        def fuse(names: tuple[str, ...]) -> Slot | None:
            if not self.fuse:
                return None
            if names in ready:
                return module_slot(ready[names])
            modules: list[Any] = [linears[n] for n in names]
            if not copies_allowed or not (pack or self.device.type == "cuda"):
                return None
            if not all(plain_linear(m) for m in modules):
                return None
            weight = torch.cat([weight_of(m) for m in modules])
            biases = [bias_of(m) for m in modules]
            bias = (
                None
                if all(b is None for b in biases)
                else torch.cat(
                    [
                        b
                        if b is not None
                        else torch.zeros(m.out_features, dtype=act_dtype, device=weight.device)
                        for b, m in zip(biases, modules, strict=True)
                    ]
                )
            )
            slot = PackedLinear(weight, bias) if pack else PlainLinear(weight, bias)
            copies.extend(slot.tensors())
            return slot

        layers: list[LayerWeights] = []
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                full = linear_names(i)
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

    def rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _native_bf16(self, *tensors: torch.Tensor) -> bool:
        """Whether the native step's elementwise loops (``native/layer_math.cpp``) compute this:
        bf16 on a CPU with the extension loaded. The native decode step makes the same choice."""
        return self.native is not None and all(t.dtype == torch.bfloat16 for t in tensors)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm as transformers computes it: normalised in float32, rounded, then scaled.

        The float32 part is torch's own ``rms_norm``: one kernel for transformers' five. A decode
        step on CUDA is bound by its number of kernels; on CPU a one-row norm took 10.9 µs
        instead of 12.0 here (decode speed did not move), its output the five ops' bit for bit.
        In bf16 on a CPU, one native loop (its float32 sum in another order)."""
        if self._native_bf16(x, weight):
            return self.native.rms_norm(x, weight, eps)
        dtype = x.dtype
        h = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)
        return weight * h.to(dtype)

    def _silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The MLP's silu(gate) * up: in bf16 on a CPU one native loop, rounding as the two ops do."""
        if self._native_bf16(gate, up):
            return self.native.silu_mul(gate, up)
        return F.silu(gate) * up

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
        residuals: Residuals | None = None,
    ) -> torch.Tensor:
        """Logits for ``ids`` (``(batch, T)``), continuing ``cache`` (or without one).

        ``pad`` (one count per row) marks that many leading positions of each row as padding
        that no other position attends to: rows of different prompt lengths, right-aligned to one
        length, decode as one batch. RoPE scores depend only on the distance
        between two positions, so a row shifted right by its padding gives the same logits as
        alone. ``rope_from`` rotates as if the cache's first slot were that position (a row
        prefilled on its own into a cache view that starts after its padding). ``residuals``
        empty: record the stream entering each layer there; recorded: start at its ``first``
        layer from the stream recorded there (no cache).

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
        cos_table, sin_table = self.rope_tables(rope_from + end, act)
        cos = cos_table[rope_from + start : rope_from + end].view(1, steps, 1, dim)
        sin = sin_table[rope_from + start : rope_from + end].view(1, steps, 1, dim)
        recording = residuals.entering if residuals is not None and not residuals.entering else None
        first = residuals.first if residuals is not None and recording is None else 0
        if residuals is not None and first:
            if cache is not None:
                raise ValueError("a pass that starts after the first layer fills no KV cache")
            x = residuals.entering[first]
        else:
            x = F.embedding(ids, self.embed).to(act).view(batch * steps, self.hidden)
        causal = steps > 1
        mask = None if pad is None else pad_mask(pad, start, end)
        gqa = heads != kv_heads
        if steps == 1 and cache is not None and first == 0 and recording is None and self.native_on:
            # The loop below for one position, as one call (the same operations, bit for bit).
            if weights.native is None:
                from tutor.engine.native_step import layers_for

                weights.native = layers_for(self.native, self, weights)
            x = self.native.step(weights.native, x, cache.data, start, cos, sin, mask)
            layers: list[LayerWeights] = []
        else:
            layers = weights.layers[first:]
        for index, lw in enumerate(layers, start=first):
            if recording is not None:
                recording.append(x)
            q, k, v = self._attention_inputs(lw, x, batch, steps, cos, sin)
            if cache is not None:
                layer_cache = cache.data[index]
                layer_cache[0, :, :, start:end] = k
                layer_cache[1, :, :, start:end] = v
                k = layer_cache[0, :, :, :end]
                v = layer_cache[1, :, :, :end]
            if steps == 1 and q.device.type == "cpu":
                attn = one_query_attention(q, k, v, mask, self.scaling)
            elif mask is None and self.native_prompt(q.dtype):
                attn = self.native.prefill_attention(q, k, v, self.scaling, PROMPT_CHUNK)
            else:
                attn = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=causal and mask is None,
                    scale=self.scaling,
                    enable_gqa=gqa,
                )
            x = self._after_attention(lw, x, attn, batch * steps)
        if cache is not None:
            cache.length = end
        if last_only:
            x = x.view(batch, steps, self.hidden)[:, -1]
        elif keep_from:
            x = x.view(batch, steps, self.hidden)[:, keep_from:].reshape(-1, self.hidden)
        logits = weights.head(self._rms(x, weights.norm, self.eps))
        return logits if last_only else logits.view(batch, steps - keep_from, -1)

    @property
    def native_on(self) -> bool:
        """Whether one-position steps run as the native decode step (loaded on a CPU only)."""
        return self.native is not None and self.use_native

    def native_prompt(self, dtype: torch.dtype) -> bool:
        """Whether a prompt's attention runs natively (``prefill.cpp``): bf16 where the CPU
        multiplies bf16 itself (elsewhere bf16 matmuls are emulated, and SDPA is faster)."""
        return self.native_on and dtype == torch.bfloat16 and not bf16_matmul_is_emulated()

    @property
    def step_kind(self) -> str:
        """What a reply's stats call this decoder's steps: "native" (one native call each) or "fast"."""
        return "native" if self.native_on else "fast"

    def _attention_inputs(
        self, lw: LayerWeights, x: torch.Tensor, batch: int, steps: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's q, k, v for the stream ``x``: ``(batch, heads, steps, head_dim)`` each, q and k
        rotated."""
        heads, kv_heads, dim = self.n_heads, self.n_kv, self.head_dim
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
        return q, k, v

    def _after_attention(
        self, lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor, rows: int
    ) -> torch.Tensor:
        """The rest of a layer once its attention is ``attn``: output projection, residual, MLP."""
        x = x + lw.o(attn.transpose(1, 2).reshape(rows, self.n_heads * self.head_dim))
        h = self._rms(x, lw.ln2, self.eps)
        if lw.gate_up is not None:
            gate_up = lw.gate_up(h)
            gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
        else:
            assert lw.gate is not None and lw.up is not None
            gate, up = lw.gate(h), lw.up(h)
        return x + lw.down(self._silu_mul(gate, up))

    def static_step(
        self,
        weights: DecoderWeights,
        token: torch.Tensor,
        position: torch.Tensor,
        first: torch.Tensor,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step in which no shape or host value changes from step to step, so a CUDA
        graph can record it once and replay it at every position (``tutor.engine.graphs``).

        ``token`` ``(rows, 1)``, ``position`` ``(1,)`` and ``first`` ``(rows,)`` (each row's
        first slot: the padding before it is hidden, as ``forward``'s ``pad``) are device
        tensors; the step writes each row's keys and values at ``position`` and attends over the
        whole cache with the slots outside ``first..position`` masked out. ``rope`` are tables
        covering the cache (held by the caller: a graph reads them where they were) and ``keys``
        is ``arange(cache.max_len)``. The same logits as ``forward`` for that step, up to
        rounding (another attention kernel, over the longer cache). ``(rows, vocab)``.
        """
        act, dim = weights.act_dtype, self.head_dim
        heads, kv_heads = self.n_heads, self.n_kv
        rows, slots = token.shape[0], keys.shape[0]
        cos = rope[0].index_select(0, position).view(1, 1, 1, dim)
        sin = rope[1].index_select(0, position).view(1, 1, 1, dim)
        # Added to the scores: 0 on each row's slots up to ``position``, -inf elsewhere; made
        # once for every layer.
        hidden = torch.zeros(rows, 1, 1, slots, dtype=act, device=keys.device)
        outside = (keys > position) | (keys < first[:, None])
        hidden.masked_fill_(outside.view(rows, 1, 1, slots), float("-inf"))
        x = F.embedding(token, self.embed).to(act).view(rows, self.hidden)
        for index, lw in enumerate(weights.layers):
            q, k, v = self._attention_inputs(lw, x, rows, 1, cos, sin)
            layer_cache = cache.data[index]
            layer_cache[0].index_copy_(2, position, k)
            layer_cache[1].index_copy_(2, position, v)
            # The query heads sharing a KV head are that head's queries (as ``repeat_kv`` pairs
            # them): plain multi-head attention with kv_heads heads, one SDPA kernel.
            grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)
            attn = F.scaled_dot_product_attention(
                grouped, layer_cache[0], layer_cache[1], attn_mask=hidden, scale=self.scaling
            )
            x = self._after_attention(lw, x, attn.reshape(rows, heads, 1, dim), rows)
        return weights.head(self._rms(x, weights.norm, self.eps))
