"""The fast decoder's attention helpers: the mask that hides each row's padding, and a decode
step's attention computed without SDPA (in bf16 on a CPU by ``native/decode_attention.cpp``;
a prompt's is ``native/prefill.cpp``)."""

from __future__ import annotations

# Imported only once a model is being loaded, so torch at the top is fine here.
import torch

from tutor.engine import native_step

# Queries per chunk of a prompt's native attention (``native/prefill.cpp``). A layer of SmolLM2 on
# an AVX-512 EPYC, 600 tokens: 2.3 ms in chunks of 128 or 256, 2.8 in 64s, 2.7 in one chunk;
# 1,000 tokens: 5.7, 5.7, 6.4 and 27 (SDPA: 4.4 and 10.2).
PROMPT_CHUNK = 128


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """A decode step's attention: one new position per row over the cache, in float32, each
    query head grouped with the others that share its KV head (as transformers' ``repeat_kv``
    pairs them). CPU SDPA's flash kernel is slow for one query: over 300 cached positions it took
    122 µs a layer against 57 µs for these few ops (700: 295 against 92), 2-3 ms of a token.
    Where the native kernels are loaded, ``native/decode_attention.cpp`` computes it, as the
    native decode step does (in bf16 over the cache in place, up to the positions that is faster
    for; else these ops)."""
    native = native_step.loaded()
    if native is not None and q.device.type == "cpu":
        return native.one_query_attention(q, k, v, mask, scale)
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)).mul_(scale)
    if mask is not None:  # (batch, 1, 1, positions): each row's padding hidden
        scores.masked_fill_(~mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1), v.float())
    return out.reshape(batch, heads, 1, dim).to(q.dtype)


def pad_mask(pad: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``(batch, 1, end - start, end)``: causal, blind to each row's padding (a padding position
    sees only itself, so a padding query's unused output stays finite)."""
    keys = torch.arange(end, device=pad.device)
    queries = torch.arange(start, end, device=pad.device)
    allowed = (keys[None, None, :] <= queries[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])
    return (allowed | (keys[None, None, :] == queries[None, :, None]))[:, None]
