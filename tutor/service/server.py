"""The engine process: the model behind an OpenAI-compatible HTTP API (see ``tutor.engine.protocol``).

``quant-tutor serve`` runs it on loopback TCP for any OpenAI client; the app starts its own
on a Unix socket in a private folder and stops it when it quits (``tutor.engine.process``).
Starlette serves the routes and uvicorn the socket; each job runs in a thread of its own
that ends with it, never a pooled one (``tutor.engine.threads`` says why), while the event
loop streams its events.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tutor.assistant.tutor_chat import MAX_SENTENCES
from tutor.engine import threads
from tutor.engine.precisions import MEASURED, PRECISIONS
from tutor.engine.process import PRIVATE_PREFIX
from tutor.engine.protocol import DEFAULT_PORT, TOKEN_ENV, model_id
from tutor.engine.remote import READ_TIMEOUT_S
from tutor.engine.settings import EngineSettings
from tutor.service.host import EngineHost
from tutor.service.http import error, failure, json_body, streamed
from tutor.service.openai_api import openai_routes

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response


def build_app(host: EngineHost, token: str) -> Starlette:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    expected = f"Bearer {token}"

    async def authorize(request: Request, call_next: Callable[[Request], Any]) -> Response:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), expected.encode()):
            return error(
                401, "Missing or wrong API key (Authorization: Bearer <token>).", "authentication_error"
            )
        response: Response = await call_next(request)
        return response

    async def status(_request: Request) -> Response:
        return JSONResponse(host.status())

    async def switch(request: Request) -> Response:
        try:
            data = await json_body(request)
            precision = str(data.get("precision", ""))
            report = await threads.in_own_thread(lambda: host.switch(precision), "switch")
        except Exception as exc:
            return failure(exc)
        return JSONResponse(report)

    async def cancel(request: Request) -> Response:
        try:
            data = await json_body(request)
        except ValueError as exc:
            return error(400, str(exc))
        return JSONResponse({"cancelled": host.cancel(str(data.get("request_id", "")))})

    async def ask(request: Request) -> Response:
        try:
            data = await json_body(request)
            question = data.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError("'question' must be a non-empty string")
            lesson_id = data.get("lesson_id")
            precision = data.get("precision")
            sentences = data.get("max_sentences") or MAX_SENTENCES
            if not isinstance(sentences, int) or not 1 <= sentences <= MAX_SENTENCES:
                raise ValueError(f"'max_sentences' must be a whole number from 1 to {MAX_SENTENCES}")
        except ValueError as exc:
            return error(400, str(exc))

        def work(emit: Callable[[str | None, Any], None], flag: threading.Event) -> None:
            answer = host.ask(question, lesson_id, precision, flag, emit, max_sentences=sentences)
            emit("answer", answer.as_dict())

        return streamed(host, data.get("request_id"), work)

    async def cliff(request: Request) -> Response:
        try:
            data = await json_body(request)
            plan = str(data.get("plan", "quick"))
            precisions = [str(p) for p in data.get("precisions") or MEASURED]
        except ValueError as exc:
            return error(400, str(exc))

        def work(emit: Callable[[str | None, Any], None], flag: threading.Event) -> None:
            emit("result", host.cliff(plan, precisions, flag, emit))

        return streamed(host, data.get("request_id"), work)

    routes = [
        Route("/qt/status", status, methods=["GET"]),
        Route("/qt/precision", switch, methods=["POST"]),
        Route("/qt/cancel", cancel, methods=["POST"]),
        Route("/qt/ask", ask, methods=["POST"]),
        Route("/qt/cliff", cliff, methods=["POST"]),
        *openai_routes(host),
    ]
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=authorize)])


class ServeError(Exception):
    """The engine can't listen where it was asked to; said in one line."""


def unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, readable by this user only; a stale one is replaced."""
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a socket left by an engine that died
        else:
            raise ServeError(f"another engine is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)  # clients may connect (and queue) before the server loop starts
    return sock


def tcp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another `quant-tutor serve` "
            "running? Choose another --port (0 picks a free one)."
        ) from None
    sock.listen(128)  # clients may connect (and queue) as soon as the address is printed
    return sock


def _watch_parent(server: Any, private: Path | None) -> None:
    """Exit when the app that started us goes away (its end of our stdin closes), even on kill -9,
    and remove the private folder the app made for us (the app is gone: nobody reads our log)."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    server.should_exit = True
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)
    time.sleep(5)
    os._exit(0)  # a job that ignores the shutdown must not keep the process alive


@click.command(
    "serve",
    help="Run the tutor's model as an OpenAI-compatible server (one model id per precision).",
)
@click.option("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
@click.option("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any free)")
@click.option(
    "--uds", type=click.Path(path_type=Path), help="listen on this Unix socket instead of TCP (mode 0600)"
)
@click.option("--model", help="local HF folder, .gguf file or hub id (default: the embedded model)")
@click.option("--device", default="cpu", help="cpu (default) or cuda")
@click.option("--threads", "torch_threads", type=int, help="torch threads (default: one per core)")
@click.option(
    "--content", type=click.Path(path_type=Path), help="lesson folder to index instead of the shipped one"
)
@click.option(
    "--lesson", help="index this lesson and its related ones before the others (default: the first)"
)
@click.option(
    "--generate-with",
    metavar="URL",
    help="generate the replies on this OpenAI-compatible server (its key in QUANT_TUTOR_REMOTE_KEY); "
    "retrieval and the checks stay here",
)
@click.option(
    "--variants-json",
    metavar="JSON",
    help='with --generate-with: {"precision": {"model": "served id", "url": null}, …} '
    "(default: the ids the server lists)",
)
@click.option(
    "--timeout",
    type=float,
    default=READ_TIMEOUT_S,
    help="with --generate-with: seconds a reply may go silent",
)
@click.option("--cache-dir", type=click.Path(path_type=Path), hidden=True)
@click.option("--watch-stdin", is_flag=True, hidden=True)  # the app's own engine process
@click.pass_context
def command(
    ctx: click.Context,
    host: str,
    port: int,
    uds: Path | None,
    model: str | None,
    device: str,
    torch_threads: int | None,
    content: Path | None,
    lesson: str | None,
    generate_with: str | None,
    variants_json: str | None,
    timeout: float,
    cache_dir: Path | None,
    watch_stdin: bool,
) -> None:
    """``quant-tutor serve``, and the app's engine process (``python -m tutor.service.server``)."""
    import uvicorn

    from tutor.library.content import load_library

    library = load_library(content)
    if not library.lessons:
        print("quant-tutor serve: no lesson could be loaded", file=sys.stderr)
        ctx.exit(2)
    token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    try:
        sock = unix_socket(uds) if uds else tcp_socket(host, port)
    except ServeError as exc:
        print(f"quant-tutor serve: {exc}", file=sys.stderr)
        ctx.exit(2)
    engine_host = EngineHost(
        library,
        lesson=lesson,
        model=model,
        device=device,
        cache_dir=cache_dir,
        threads=torch_threads,
        settings=EngineSettings.from_flags(generate_with, variants_json, timeout),
    )
    threads.start(engine_host.load, "load")
    config = uvicorn.Config(
        build_app(engine_host, token), log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    if watch_stdin:
        # The app makes a folder of its own for our socket and log (tutor.engine.process).
        private = uds.parent if uds and uds.parent.name.startswith(PRIVATE_PREFIX) else None
        threading.Thread(target=_watch_parent, args=(server, private), name="parent", daemon=True).start()
    if not uds:
        address, port = sock.getsockname()[:2]
        print(f"quant-tutor engine: http://{address}:{port}/v1", flush=True)
        if not os.environ.get(TOKEN_ENV):
            print(f"API key (random for this launch): {token}", flush=True)
        if generate_with is None:
            print("Models: " + ", ".join(model_id(engine_host.model_name, p) for p in PRECISIONS), flush=True)
        else:
            print(f"Replies generated on: {generate_with}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if uds:
            with contextlib.suppress(OSError):
                uds.unlink()


if __name__ == "__main__":
    command(prog_name="quant-tutor serve")
