"""The engine process's wire protocol, shared by the server and its client (no torch here).

OpenAI-compatible where the concept exists, so any OpenAI client can talk to
``quant-tutor serve``:

- ``GET  /v1/models``: one model id per precision, ``<model>:<precision>``
  (e.g. ``smollm2-135m-instruct:nf4``).
- ``POST /v1/chat/completions``: ``model``, ``messages``, ``max_tokens``, ``temperature``
  (absent or 0: greedy), ``top_p``, ``seed``, ``stream``. Streamed as server-sent events,
  ``data: {chunk}`` lines ending with ``data: [DONE]``; closing the stream cancels the reply
  within one token. The last chunk carries ``usage`` and the engine's own ``x_stats``.

The project's own endpoints, where OpenAI has none (all JSON; the streamed ones are SSE
with named events, ``event: <name>`` then ``data: <json>``):

- ``GET  /qt/status``: loading state and progress, precision, weights, memory.
- ``POST /qt/precision`` ``{"precision"}``: prepare and switch; returns the switch report.
- ``POST /qt/ask`` ``{"question", "lesson_id", "precision", "request_id", "max_sentences"}``
  (the last optional, 1 to 3, default 3): the tutor's grounded answer, streamed: ``waiting``
  (another job holds the engine), ``prepared`` (quote, citations or the decline), ``token``
  (``{"text"}``), then ``answer`` (the whole answer with its support check and stats) or
  ``error``.
- ``POST /qt/cancel`` ``{"request_id"}``: stop that reply; it still ends with ``answer``,
  whose stats say ``stop: "cancelled"``.
- ``POST /qt/cliff`` ``{"plan", "precisions", "request_id"}``: the Lab's measurement,
  streamed: ``progress`` (``{"phase", "done", "total"}``), ``row`` (one precision, as soon
  as it is measured), then ``result`` or ``error``. Closing the stream cancels it.

Every request carries ``Authorization: Bearer <token>`` (the token is random per launch);
the app's own engine also listens only on a Unix socket in a private (0700) folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tutor.engine.precisions import PRECISIONS

TOKEN_ENV = "QUANT_TUTOR_ENGINE_TOKEN"
DEFAULT_PORT = 8757
MODEL_NAME = "smollm2-135m-instruct"  # the embedded model's id stem


def model_id(model: str, precision: str) -> str:
    return f"{model}:{precision}"


def precision_of(model_id_text: str | None, default: str) -> str:
    """The precision a model id asks for; ``default`` when it names none (``<model>`` alone)."""
    if not model_id_text or ":" not in model_id_text:
        return default
    precision = model_id_text.rsplit(":", 1)[1]
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r} in model id {model_id_text!r}; "
            f"use one of {', '.join(PRECISIONS)}"
        )
    return precision


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event (``event`` None: an unnamed ``data:`` line, as OpenAI streams)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


@dataclass(frozen=True)
class Event:
    name: str  # "message" when the server named none
    data: Any  # decoded JSON, or the raw text when it is not JSON (``[DONE]``)


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a server-sent event stream (comments and blank keep-alives skipped)."""
    data: list[str]
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield Event(name, value)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
