"""Prompts as token ids: a chat through the model's template or plain text, and the room a
reply has after them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tutor.engine.errors import PromptTooLongError
from tutor.engine.generate import Messages


def encode(tokenizer: Any, messages: Messages, *, system: str | None, raw: bool, prefix: str) -> list[int]:
    """Token ids for ``messages`` (see ``Engine.encode``)."""
    if prefix:
        start = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return encode(tokenizer, messages, system=system, raw=raw, prefix="") + [int(t) for t in start]
    if raw:
        if not isinstance(messages, str):
            raise TypeError("raw=True takes a string")
        return list(tokenizer(messages)["input_ids"])
    chat: list[Mapping[str, str]] = (
        [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    )
    if system is not None:
        chat = [{"role": "system", "content": system}, *chat]
    encoded = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer names."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def reply_budget(ids: list[int], max_positions: int, max_new_tokens: int) -> int:
    """How many tokens a reply to ``ids`` may have: ``max_new_tokens``, or less where the model's
    positions run out. Raises PromptTooLongError for an empty prompt or one with no room left."""
    if not ids:
        raise PromptTooLongError("The prompt is empty.")
    room = max_positions - len(ids)
    if room < 1:
        raise PromptTooLongError(
            f"The prompt has {len(ids)} tokens; this model reads at most {max_positions}."
        )
    return max(0, min(int(max_new_tokens), room))
