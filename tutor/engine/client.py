"""The app's side of the engine protocol (``tutor.engine.protocol``): httpx, no torch.

Streamed calls are generators of :class:`~tutor.engine.protocol.Event`; closing one early
closes the connection, which the engine takes as a cancel. A dead or unreachable engine
raises :class:`EngineGone`; a request the engine refuses raises :class:`EngineRefused`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tutor.engine.protocol import Event, parse_sse


class EngineGone(Exception):
    """The engine process can't be reached or stopped mid-way."""


class EngineRefused(Exception):
    """The engine answered with an error (bad input, not ready); the message says which."""


class EngineClient:
    def __init__(self, token: str, *, uds: Path | None = None, base_url: str = "http://engine") -> None:
        transport = httpx.HTTPTransport(uds=str(uds)) if uds is not None else None
        self.uds = uds
        self._http = httpx.Client(
            base_url=base_url,
            transport=transport,
            headers={"Authorization": f"Bearer {token}"},
            # No read timeout: a measurement streams for minutes, and a dead engine closes the socket.
            timeout=httpx.Timeout(10.0, read=None),
        )

    def close(self) -> None:
        self._http.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise EngineGone(f"the engine stopped answering ({type(exc).__name__}: {exc})") from exc
        except RuntimeError as exc:
            if not self._http.is_closed:
                raise
            # Another thread let go of this engine (it restarts or the app quits) mid-request.
            raise EngineGone("the connection to the engine was closed") from exc

    def _json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        with self._errors():
            response = self._http.request(method, path, json=payload)
        return _checked(response)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", "/qt/status")
        return data

    def models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    def switch(self, precision: str) -> dict[str, Any]:
        data: dict[str, Any] = self._json("POST", "/qt/precision", {"precision": precision})
        return data

    def cancel(self, request_id: str) -> bool:
        return bool(self._json("POST", "/qt/cancel", {"request_id": request_id})["cancelled"])

    def _stream(self, path: str, payload: dict[str, Any]) -> Iterator[Event]:
        with self._errors(), self._http.stream("POST", path, json=payload) as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            yield from parse_sse(response.iter_lines())

    def ask(
        self,
        question: str,
        *,
        lesson_id: str | None,
        precision: str | None,
        request_id: str,
        max_sentences: int | None = None,
    ) -> Iterator[Event]:
        """``waiting``, ``prepared``, ``token``… then ``answer`` (or ``error``)."""
        payload = {
            "question": question,
            "lesson_id": lesson_id,
            "precision": precision,
            "request_id": request_id,
            "max_sentences": max_sentences,
        }
        return self._stream("/qt/ask", payload)

    def cliff(self, plan: str, precisions: list[str], *, request_id: str) -> Iterator[Event]:
        """``progress`` and ``row`` events, then ``result`` (or ``error``)."""
        return self._stream("/qt/cliff", {"plan": plan, "precisions": precisions, "request_id": request_id})


def _checked(response: httpx.Response) -> Any:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        raise EngineRefused(message or f"HTTP {response.status_code}")
    return data
