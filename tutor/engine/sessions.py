"""Decode sessions: one reply's prefill and steps on the fast decoder (plain or context-aware)
or on any causal LM through transformers (``GenericSession``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tutor.engine.decoder import FastDecoder, KVCache
from tutor.engine.decoder_weights import DecoderWeights
from tutor.engine.generate import Session


def mix_contrast(logits: torch.Tensor, plain: torch.Tensor, alpha: float) -> torch.Tensor:
    """Context-aware decoding (Shi et al., 2023): ``(1 + alpha) * with - alpha * without``, in fp32."""
    return (1 + alpha) * logits.float() - alpha * plain.float()


def prefill_rows(
    decoder: FastDecoder, weights: DecoderWeights, cache: KVCache, rows: Sequence[list[int]]
) -> tuple[list[torch.Tensor], list[int]]:
    """Each prompt of ``rows`` prefilled on its own (no pass over padding) into its row of
    ``cache``, right-aligned to the longest after zeroed padding slots that a step's mask hides.
    Returns each row's last logits and its padding."""
    length = max(len(row) for row in rows)
    pads = [length - len(row) for row in rows]
    logits = []
    for index, (row, pad) in enumerate(zip(rows, pads, strict=True)):
        cache.data[:, :, index, :, :pad].zero_()  # hidden by the mask; zeros, not garbage
        view = KVCache(cache.data[:, :, index : index + 1, :, pad:])
        tensor = torch.tensor([row], dtype=torch.long, device=decoder.device)
        logits.append(decoder.forward(weights, tensor, view, rope_from=pad)[0])
    cache.length = length
    return logits, pads


class FastContrastSession:
    """Context-aware decoding on the fast decoder: the prompt with the passages and the one
    without them decode as one batch of two (one pass per token), each prefilled on its own
    into its row of one KV cache (``prefill_rows``)."""

    def __init__(
        self, decoder: FastDecoder, weights: DecoderWeights, max_len: int, plain_ids: list[int], alpha: float
    ) -> None:
        self.kind = f"{decoder.step_kind}+cad"
        self.decoder, self.weights, self.alpha = decoder, weights, alpha
        self.plain_ids = plain_ids
        self.max_len = max_len
        self.cache: KVCache | None = None
        self.pad: torch.Tensor | None = None
        self._tokens = torch.zeros(2, 1, dtype=torch.long, device=decoder.device)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        extra = max(0, len(self.plain_ids) - len(ids))  # the cache is sized for the longer prompt
        self.cache = self.decoder.new_cache(self.max_len + extra, self.weights.act_dtype, batch=2)
        logits, pads = prefill_rows(self.decoder, self.weights, self.cache, (ids, self.plain_ids))
        self.pad = torch.tensor(pads, device=self.decoder.device)
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

    def __init__(self, decoder: FastDecoder, weights: DecoderWeights, max_len: int) -> None:
        self.kind = decoder.step_kind
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


def open_session(
    model: Any,
    decoder: FastDecoder | None,
    weights: DecoderWeights | None,
    device: torch.device,
    max_len: int,
    contrast: tuple[list[int], float] | None = None,
) -> Session:
    """A session for one reply of up to ``max_len`` positions: on the fast decoder with
    ``weights`` when there is one (its steps replayed as a CUDA graph where the decoder records
    them and the precision allows), else through ``model``. With ``contrast`` (the prompt without
    the passages, alpha) it decodes context-aware (``mix_contrast``)."""
    if decoder is not None:
        assert weights is not None
        if decoder.graphs:
            from tutor.engine.graphs import GraphSession, static_step

            # Room for either prompt: a reply's positions after the longer one.
            longest = max_len + (len(contrast[0]) if contrast is not None else 0)
            step = static_step(decoder, weights, longest, rows=1 if contrast is None else 2)
            if step is not None:
                return GraphSession(step, weights, contrast)
        if contrast is not None:
            return FastContrastSession(decoder, weights, max_len, *contrast)
        return FastSession(decoder, weights, max_len)
    static = device.type == "cuda"
    if contrast is not None:
        plain_ids, alpha = contrast
        return PairContrastSession(
            GenericSession(model, device, max_len, static=static),
            GenericSession(model, device, len(plain_ids) + max_len, static=static),
            plain_ids,
            alpha,
        )
    return GenericSession(model, device, max_len, static=static)
