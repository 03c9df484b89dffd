"""Whole token windows read for the lab: next-token logits (at one precision, or each decoder
layer at its own) and greedy continuations of many prompts in one batch.

These run under the engine's lock, which ``Engine`` takes around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from tutor.engine.errors import EngineError, PromptTooLongError
from tutor.engine.generate import greedy
from tutor.engine.precisions import check_precision

if TYPE_CHECKING:
    from tutor.engine.decoder import FastDecoder, Residuals
    from tutor.engine.decoder_weights import DecoderWeights
    from tutor.engine.precision_manager import PrecisionManager


def window_ids(
    windows: Sequence[Sequence[int]] | torch.Tensor, start: int, max_positions: int
) -> torch.Tensor:
    """``windows`` as one ``(batch, length)`` tensor, checked: ``start`` inside, not too long."""
    ids = windows if isinstance(windows, torch.Tensor) else torch.tensor([list(w) for w in windows])
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError("windows must be a (batch, length) batch of token ids")
    if not 0 <= start < ids.shape[1]:
        raise ValueError(f"start must be in [0, {ids.shape[1]}), got {start}")
    if ids.shape[1] > max_positions:
        raise PromptTooLongError(f"Windows of {ids.shape[1]} tokens exceed {max_positions}.")
    return ids


def window_logits(
    model: Any,
    decoder: FastDecoder | None,
    weights: DecoderWeights | None,
    ids: torch.Tensor,
    *,
    start: int,
    batch_size: int,
    device: torch.device,
    residuals: Residuals | None = None,
    as_computed: bool = False,
) -> torch.Tensor:
    """Logits from position ``start`` on of every window in ``ids``, float32 on the CPU: on the
    fast decoder with ``weights`` when there is one, else through ``model``; no KV cache.
    ``residuals`` (the fast decoder's, for one pass over all of ``ids``) records or resumes
    the residual stream (``FastDecoder.forward``). ``as_computed``: in the dtype they were
    computed in (bf16 is half float32's bytes), for a caller that only reads them."""
    if residuals is not None and (decoder is None or batch_size < ids.shape[0]):
        raise EngineError("Residuals are kept for one pass of the fast decoder over every window.")
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for first in range(0, ids.shape[0], max(1, batch_size)):
            chunk = ids[first : first + batch_size].to(device, dtype=torch.long)
            if decoder is not None:
                assert weights is not None
                logits = decoder.forward(
                    weights, chunk, None, last_only=False, keep_from=start, residuals=residuals
                )
            else:
                logits = model(input_ids=chunk, use_cache=False).logits[:, start:]
            outputs.append(logits)
    if as_computed:
        return outputs[0].cpu() if len(outputs) == 1 else torch.cat([logits.cpu() for logits in outputs])
    # Made outside inference mode, as ordinary tensors: the Lab normalizes them in place. One
    # pass (the Lab's usual read) is converted with no second copy (tens of MB a batch).
    if len(outputs) == 1:
        only = outputs[0].cpu()
        return only.float() if only.dtype != torch.float32 else only.clone()
    return torch.cat([logits.float().cpu() for logits in outputs])


def mixed_weights(
    decoder: FastDecoder | None, manager: PrecisionManager, mix: Sequence[str]
) -> DecoderWeights:
    """The fast decoder's weights with layer ``i`` taken from precision ``mix[i]``'s (each
    built now if it is not held; all of them kept while held here)."""
    if decoder is None or len(mix) != decoder.n_layers:
        raise EngineError("A mix needs the fast decoder and one precision for each of its layers.")
    names = [check_precision(p) for p in mix]
    held: dict[str, DecoderWeights] = {}
    for name in dict.fromkeys(names):
        weights = manager.prepare(name)[0].weights
        assert weights is not None  # the fast decoder builds its view of every precision
        held[name] = weights
    if len({w.act_dtype for w in held.values()}) != 1:
        raise EngineError("A mix needs precisions that compute in one dtype (bf16, int8, nf4, fp4).")
    layers = [held[name].layers[i] for i, name in enumerate(names)]
    return replace(next(iter(held.values())), precision="mixed", layers=layers, copies=[])


def greedy_batch(
    decoder: FastDecoder,
    weights: DecoderWeights,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (all of one length) decoded as one batch, each cut
    before its first stop token."""
    steps: list[torch.Tensor] = []
    with torch.inference_mode():
        ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=decoder.device)
        cache = decoder.new_cache(ids.shape[1] + max_new_tokens, weights.act_dtype, batch=len(prompts))
        logits = decoder.forward(weights, ids, cache)
        for step in range(max_new_tokens):
            steps.append(greedy(logits))
            if step + 1 < max_new_tokens:
                logits = decoder.forward(weights, steps[-1][:, None], cache)
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
    return [row[: next((i for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]
