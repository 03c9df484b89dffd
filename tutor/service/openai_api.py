"""The engine process's OpenAI-shaped routes: ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (prompt scoring), as ``tutor.engine.protocol`` documents them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tutor.engine import threads
from tutor.engine.protocol import model_id, precision_of
from tutor.service.host import READY, EngineHost, NotReadyError
from tutor.service.http import error, failure, json_body, streamed

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route


def openai_routes(host: EngineHost) -> list[Route]:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def models(_request: Request) -> Response:
        name = host.model_name
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": model_id(name, p), "object": "model", "created": 0, "owned_by": "quant-tutor"}
                    for p in host.precisions()
                ],
            }
        )

    async def completions(request: Request) -> Response:
        """OpenAI's legacy completions, for scoring a prompt: ``echo`` with ``max_tokens`` 0 and
        ``logprobs`` k returns each prompt token's log-probability and the k likeliest tokens
        (what the Lab's remote estimates read). Generation is /v1/chat/completions' job."""
        try:
            data = await json_body(request)
            prompt = data.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("'prompt' must be a non-empty string")
            engine = host.engine
            precision = precision_of(data.get("model"), engine.precision if engine else "bf16")
            top = int(data.get("logprobs") or 0)
            if not 0 <= top <= MAX_LOGPROBS:
                raise ValueError(f"'logprobs' must be 0 to {MAX_LOGPROBS}")
            # Other servers want a token generated; here the prompt's scores come back alone.
            if not data.get("echo") or int(data.get("max_tokens") or 0) > 1:
                raise ValueError(
                    "this server's /v1/completions scores prompts (echo: true, max_tokens 0 or 1); "
                    "generate with /v1/chat/completions"
                )
        except (ValueError, TypeError) as exc:
            return error(400, str(exc))
        try:
            scored = await threads.in_own_thread(
                lambda: host.score_prompt(prompt, precision, top, threading.Event()), "score"
            )
        except Exception as exc:
            return failure(exc)
        count = len(scored["tokens"])
        return JSONResponse(
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id(host.model_name, precision),
                "choices": [{"index": 0, "text": prompt, "logprobs": scored, "finish_reason": "length"}],
                "usage": {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count},
            }
        )

    async def chat_completions(request: Request) -> Response:
        try:
            data = await json_body(request)
            messages = _messages(data.get("messages"))
            engine = host.engine
            precision = precision_of(data.get("model"), engine.precision if engine else "bf16")
            max_tokens = int(data.get("max_completion_tokens") or data.get("max_tokens") or 256)
            temperature = data.get("temperature")
            top_p = data.get("top_p")
            seed = data.get("seed")
        except (ValueError, TypeError) as exc:
            return error(400, str(exc))
        if host.state != READY:  # before the stream starts, so a client can tell and try again
            return failure(NotReadyError(host.error or host.detail or host.state))
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        name = model_id(host.model_name, precision)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }

        def generate(on_token: Callable[[Any], None], flag: threading.Event) -> Any:
            return host.chat(
                messages,
                precision,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                cancel=flag,
                on_token=on_token,
            )

        if not data.get("stream"):
            try:
                reply = await threads.in_own_thread(
                    lambda: generate(lambda _event: None, threading.Event()), completion_id
                )
            except Exception as exc:
                return failure(exc)
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply.text},
                            "finish_reason": _finish_reason(reply.stats.stop_reason),
                        }
                    ],
                    "usage": _usage(reply),
                    "x_stats": reply.stats.as_dict(),
                }
            )

        def work(emit: Callable[[str | None, Any], None], flag: threading.Event) -> None:
            emit(None, chunk({"role": "assistant", "content": ""}))
            reply = generate(lambda event: emit(None, chunk({"content": event.text})), flag)
            emit(
                None,
                chunk(
                    {},
                    _finish_reason(reply.stats.stop_reason),
                    usage=_usage(reply),
                    x_stats=reply.stats.as_dict(),
                ),
            )
            emit(None, "[DONE]")

        return streamed(host, completion_id, work)

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


MAX_LOGPROBS = 20  # top tokens per place a completion may ask for (vLLM's default limit)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be text")
        messages.append({"role": message["role"], "content": content})
    return messages


def _finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "max_tokens" else "stop"


def _usage(reply: Any) -> dict[str, int]:
    prompt = reply.stats.prompt_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": reply.stats.tokens,
        "total_tokens": prompt + reply.stats.tokens,
    }


# --- the socket and the process ------------------------------------------------------------
