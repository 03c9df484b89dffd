"""What every route of the engine process shares: its error answers, reading a JSON body, and
a job's events streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from tutor.engine import threads
from tutor.engine.errors import EngineError
from tutor.engine.protocol import sse
from tutor.service.host import Cancelled, EngineHost, NotReadyError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

KEEPALIVE_S = 1.0  # an idle stream sends a comment this often, so a closed client is noticed
Work = Callable[[Callable[[str | None, Any], None], threading.Event], None]


def error(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def failure(exc: BaseException) -> Response:
    if isinstance(exc, NotReadyError):
        return error(503, f"The model is not ready: {exc}", "not_ready")
    if isinstance(exc, ValueError | EngineError):
        return error(400, str(exc))
    return error(500, f"{type(exc).__name__}: {exc}", "server_error")


def streamed(host: EngineHost, request_id: str | None, work: Work) -> Response:
    """Run ``work(emit, cancel)`` in a thread and stream what it emits as server-sent events.

    A client that goes away (closed stream, dead process) sets ``cancel``; the job stops at
    its next check (a reply: before its next token).
    """
    from starlette.responses import StreamingResponse

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str | None, Any] | None] = asyncio.Queue()
    cancel = threading.Event()

    def emit(event: str | None, data: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, (event, data))

    def run() -> None:
        try:
            with host.tracked(request_id, cancel):
                work(emit, cancel)
        except Cancelled as exc:
            emit("error", {"message": str(exc), "cancelled": True})
        except (ValueError, EngineError, NotReadyError) as exc:
            emit("error", {"message": str(exc)})
        except Exception as exc:
            emit("error", {"message": f"{type(exc).__name__}: {exc}"})
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, None)

    async def events() -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if item is None:
                    return
                yield sse(*item)
        finally:
            cancel.set()

    threads.start(run, f"job-{request_id or 'anon'}")
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def json_body(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise ValueError(f"the request body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data
