"""The shapes the engine process sends over the wire: plain dicts made from the engine's and the
tutor's objects, for :class:`tutor.service.host.EngineHost`'s jobs to emit or return as JSON."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tutor.assistant.grounding import PreparedAnswer


def prepared_dict(prepared: PreparedAnswer) -> dict[str, Any]:
    """What the learner sees before the model runs: the quote and citations, or the decline."""
    return {
        "question": prepared.question,
        "question_cut": prepared.question_cut,
        "grounded": prepared.grounded,
        "decline": prepared.decline,
        "quote": prepared.quote.as_dict() if prepared.quote else None,
        "citations": [c.as_dict() for c in prepared.citations],
    }


def prompt_logprobs_dict(
    ids: Sequence[int], logprobs: torch.Tensor, top: int, piece: Callable[[list[int]], str]
) -> dict[str, Any]:
    """An OpenAI completion's ``logprobs`` with ``echo``: each token of ``ids`` after the first, its
    log-probability (``logprobs[i]`` is the distribution over token ``i + 1``) and the ``top``
    likeliest tokens there; ``piece`` decodes a token's text."""
    import torch

    said = torch.tensor(ids[1:])
    chosen = logprobs.gather(-1, said[:, None])[:, 0].tolist()
    values, indices = logprobs.topk(max(top, 1), -1)
    tops: list[dict[str, float] | None] = [None]
    for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
        found: dict[str, float] = {}
        for token, value in zip(row_indices[:top], row_values[:top], strict=True):
            found.setdefault(piece([token]), value)  # two ids may read alike: the likelier stays
        tops.append(found)
    pieces = [piece([token]) for token in ids]
    offsets = [0]
    for text_piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(text_piece))
    return {
        "tokens": pieces,
        "token_logprobs": [None, *chosen],
        "top_logprobs": tops if top else None,
        "text_offset": offsets,
    }
