"""The tutor's generation on an OpenAI-compatible server (vLLM, llama.cpp's llama-server,
Ollama, or another ``quant-tutor serve``): the lesson, retrieval, the quote and the support
check stay local; only the model's reply moves.

Precision becomes a choice among *served variants*: each precision name maps to a model id the
server serves. ``quant-tutor serve`` names its ids ``<model>:<precision>``, so its variants are
found by listing ``/models``; any other server's ids are offered under their own names, and a
mapping file (TOML, ``bf16 = "served-model-id"``) names them. A variant may live on a server of
its own (``nf4 = { model = "id", url = "http://host:8001/v1" }``): vLLM serves one model per
process, so two precisions of one model are two servers. TTFT and tok/s are measured here,
on the client: they include the network. Context-aware decoding needs the model's logits, so a
remote reply is plain decoding.
"""

from __future__ import annotations

import contextlib
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tutor.engine.errors import EngineError
from tutor.engine.generate import Cancel, Messages, OnToken, is_cancelled
from tutor.engine.protocol import parse_sse
from tutor.engine.reports import Reply, ReplyStats, TokenEvent

READ_TIMEOUT_S = 120.0  # a reply silent this long counts as cut (the config file's timeout_s)
DETAIL_CHARS = 240  # of a server's own error message, in the one line that reports it
RETRIES = 3  # tries for a 429 or 5xx answer, or a connection refused, before giving up
BACKOFF_S = 0.5  # the first wait between tries; doubled each time
# The remote server's API key. Not TOKEN_ENV: the app hands its own engine process a token of
# its own in that variable, and that process may be the one talking to the remote server.
KEY_ENV = "QUANT_TUTOR_REMOTE_KEY"


class RemoteError(EngineError):
    """The server could not be reached or refused; the message names the server and why."""


@dataclass(frozen=True)
class Variant:
    """One served variant: the model id to ask for, and its own server's URL (None: the engine's)."""

    model: str
    url: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


Variants = dict[str, Variant]


def read_variants(path: Path) -> Variants:
    """A mapping file: ``precision = "served model id"`` per line (TOML)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RemoteError(f"cannot read the variants file {path}: {exc}") from None
    return check_variants(data, str(path))


def check_variants(data: object, where: str) -> Variants:
    """``data`` (precision = "id" or = { model = "id", url = "…/v1" }) as variants, or a
    RemoteError naming ``where`` it was read and the first bad line."""
    if not isinstance(data, dict) or not data:
        raise RemoteError(f'{where}: must be precision = "served model id" lines')
    found: Variants = {}
    for name, value in data.items():
        if isinstance(value, dict) and set(value) <= {"model", "url"}:
            model, url = value.get("model"), value.get("url")
        else:
            model, url = value, None
        if not (isinstance(model, str) and model) or not (url is None or (isinstance(url, str) and url)):
            raise RemoteError(
                f'{where}: each line must be precision = "served model id" or '
                f'precision = {{ model = "id", url = "http://…/v1" }} (bad: {name})'
            )
        found[str(name)] = Variant(model, None if url is None else url.rstrip("/"))
    return found


def variants_from_ids(ids: Sequence[str]) -> Variants:
    """Served ids as variants: ``<model>:<precision>`` under its precision, any other under its id."""
    from tutor.engine.precisions import PRECISIONS

    found: Variants = {}
    for served in ids:
        name = served.rsplit(":", 1)[-1] if ":" in served else served
        found.setdefault(name if name in PRECISIONS else served, Variant(served))
    return found


def client(read_timeout_s: float = READ_TIMEOUT_S) -> httpx.Client:
    """An HTTP client for a server: 10 s to connect, ``read_timeout_s`` of silence in a reply."""
    return httpx.Client(timeout=httpx.Timeout(10.0, read=read_timeout_s))


@dataclass(frozen=True)
class ServedSwitch:
    """A switch between served variants: nothing is built here, the next request names the other id."""

    precision: str
    previous: str
    served: str
    url: str
    weights_mib: None = None  # the server's, not reported to a client

    def describe(self) -> str:
        return f"switched {self.previous} -> {self.precision}: {self.url} serves it as {self.served}."

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RemoteEngine:
    """What ``tutor.assistant.tutor_chat.ask`` needs of an engine, over HTTP."""

    base_url: str  # ends in /v1
    variants: Variants  # precision (or a served id) -> the model id to ask for, and where
    precision: str
    api_key: str | None = None
    http: httpx.Client = field(default_factory=client)
    backoff_s: float = BACKOFF_S

    @classmethod
    def connect(
        cls,
        base_url: str,
        *,
        api_key: str | None = None,
        variants: Mapping[str, Variant] | None = None,
        precision: str | None = None,
        http: httpx.Client | None = None,
    ) -> RemoteEngine:
        """Reach the server; without ``variants`` they come from its ``/models``."""
        engine = cls(base_url.rstrip("/"), {}, "", api_key, http or client())
        engine.variants = dict(variants) if variants else variants_from_ids(engine.served())
        if not engine.variants:
            raise RemoteError(f"{engine.base_url} serves no model")
        engine.switch(precision or ("bf16" if "bf16" in engine.variants else next(iter(engine.variants))))
        return engine

    @property
    def device(self) -> str:
        """Where the current variant is served."""
        variant = self.variants.get(self.precision)
        return f"remote {(variant.url if variant else None) or self.base_url}"

    def served(self) -> list[str]:
        """The model ids the server lists."""
        response = self._send(self.base_url, "GET", "/models")
        try:
            return [str(model["id"]) for model in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteError(f"{self.base_url}/models did not list models ({exc})") from None

    def switch(self, precision: str, *, wait: bool | float = True) -> ServedSwitch:
        if precision not in self.variants:
            raise RemoteError(
                f"{self.base_url} serves no variant for {precision!r}; it serves: {', '.join(self.variants)}"
            )
        previous, self.precision = self.precision, precision
        variant = self.variants[precision]
        return ServedSwitch(precision, previous, variant.model, variant.url or self.base_url)

    def generate(
        self,
        messages: Messages,
        *,
        max_new_tokens: int = 96,
        on_token: OnToken = None,
        cancel: Cancel = None,
        wait: bool | float = True,
        contrast: Any = None,
        alpha: float = 0.0,
        prefix: str = "",
        **_options: Any,
    ) -> Reply:
        """One streamed chat completion at the current variant, greedy. ``contrast``/``alpha``
        are accepted and not used (context-aware decoding needs the logits)."""
        chat = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if prefix:
            chat.append({"role": "assistant", "content": prefix})
        body = {
            "model": self.variants[self.precision].model,
            "messages": chat,
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        pieces: list[str] = []
        first: float | None = None
        usage: dict[str, Any] = {}
        stop_reason = "max_tokens"
        # Leaving the block closes the stream: the server stops the reply.
        where = self.variants[self.precision].url or self.base_url
        with contextlib.closing(self._stream(where, "/chat/completions", body)) as response:
            try:
                for event in parse_sse(response.iter_lines()):
                    if event.data == "[DONE]":
                        break
                    if not isinstance(event.data, dict):
                        continue
                    failure = _stream_error(event.name, event.data)
                    if failure and not pieces:
                        raise RemoteError(f"{where} could not answer: {failure}")
                    if failure:
                        stop_reason = f"cut ({failure})"
                        break
                    usage = event.data.get("usage") or usage
                    for choice in event.data.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            first = first or time.perf_counter()
                            pieces.append(text)
                            if on_token is not None:
                                on_token(TokenEvent(-1, text, len(pieces) - 1))
                        if choice.get("finish_reason") == "stop":
                            stop_reason = "eos"
                    if is_cancelled(cancel):
                        stop_reason = "cancelled"
                        break  # closing the stream cancels the reply on the server
            except httpx.HTTPError as exc:
                stop_reason = f"cut ({_why(exc)})"  # what arrived stays
        return Reply("".join(pieces), [], self._stats(started, first, len(pieces), usage, stop_reason))

    def prompt_logprobs(self, text: str, top: int) -> tuple[list[float], list[dict[str, float]]]:
        """Each token of ``text`` after the first: its log-probability given the ones before it
        and the ``top`` likeliest tokens there, at the current variant. Asked as an OpenAI
        completion with ``echo`` and ``logprobs`` (``max_tokens`` 1, which some servers require;
        the generated token is dropped). A server that returns none raises RemoteError."""
        variant = self.variants[self.precision]
        where = variant.url or self.base_url
        body = {
            "model": variant.model,
            "prompt": text,
            "max_tokens": 1,
            "echo": True,
            "logprobs": top,
            "temperature": 0,
        }
        response = self._send(where, "POST", "/completions", body)
        try:
            found = response.json()["choices"][0]["logprobs"]
            offsets, chosen, tops = found["text_offset"], found["token_logprobs"], found["top_logprobs"]
            tokens = found["tokens"]
            inside = [i for i, at in enumerate(offsets) if at < len(text)][1:]  # the prompt's, bar the first
            # Some servers add the prompt's own token to its place's list, however unlikely: the
            # ``top`` likeliest are kept.
            lists = [_likeliest(tops[i], top) for i in inside]
            scores = [float(chosen[i]) for i in inside]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteError(
                f"{where} returned no prompt log-probabilities (an OpenAI completion with echo and "
                f"logprobs; {_why(exc)}): PPL and KL need them, or the local engine"
            ) from None
        if _shifted(lists, [tokens[i] for i in inside], [tokens[i + 1] for i in inside[:-1]]):
            raise RemoteError(
                f"{where} returned prompt log-probabilities shifted by one place (each token scored by the "
                "prediction made after it, a known bug of llama-cpp-python's server): they are not used"
            )
        return scores, lists

    def _stats(
        self, started: float, first: float | None, pieces: int, usage: Mapping[str, Any], stop_reason: str
    ) -> ReplyStats:
        ended = time.perf_counter()
        tokens = int(usage.get("completion_tokens") or pieces)
        decode_s = ended - first if first is not None else 0.0
        return ReplyStats(
            precision=self.precision,
            device=self.device,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            tokens=tokens,
            ttft_s=None if first is None else first - started,
            prefill_s=None,
            prefill_tok_s=None,
            decode_s=decode_s,
            decode_tok_s=(tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None,
            total_s=ended - started,
            weights_mib=None,  # the server's, not reported to a client
            rss_mib=None,
            peak_rss_mib=None,
            cuda_peak_mib=None,
            cancelled=stop_reason == "cancelled",
            stop_reason=stop_reason,
            sampling="greedy",
            decoder="remote",
        )

    # --- HTTP --------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _send(self, url: str, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return self._retrying(
            url, lambda: self.http.request(method, url + path, headers=self._headers(), json=body)
        )

    def _stream(self, url: str, path: str, body: dict[str, Any]) -> httpx.Response:
        def start() -> httpx.Response:
            request = self.http.build_request("POST", url + path, headers=self._headers(), json=body)
            return self.http.send(request, stream=True)

        return self._retrying(url, start)

    def _retrying(self, url: str, send: Callable[[], httpx.Response]) -> httpx.Response:
        """``send()`` until it answers 2xx; 429, 5xx and refused connections are tried again."""
        wait = self.backoff_s
        for attempt in range(1, RETRIES + 1):
            try:
                response = send()
            except httpx.HTTPError as exc:
                if attempt == RETRIES or not isinstance(exc, httpx.ConnectError):
                    raise RemoteError(f"cannot reach the engine at {url}: {_why(exc)}") from None
            else:
                if response.status_code < 400:
                    return response
                response.read()
                retry = response.status_code == 429 or response.status_code >= 500
                if not retry or attempt == RETRIES:
                    raise RemoteError(_refusal(url, response)) from None
                response.close()
            time.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")  # pragma: no cover


def _shifted(lists: Sequence[Mapping[str, float]], own: Sequence[str], following: Sequence[str]) -> bool:
    """Whether the likeliest token at each place is far more often the *next* token than the
    place's own: the lists were made after reading the token they should predict."""
    first = [max(found, key=found.__getitem__) if found else None for found in lists]
    hits = sum(best == token for best, token in zip(first, own, strict=False))
    ahead = sum(best == token for best, token in zip(first, following, strict=False))
    return ahead > max(2 * hits, len(lists) // 10)


def _likeliest(found: Mapping[str, float], count: int) -> dict[str, float]:
    return dict(sorted(found.items(), key=lambda item: -float(item[1]))[:count])


def _stream_error(name: str, data: Mapping[str, Any]) -> str | None:
    """The message of an error the server sent inside the stream, if this event is one."""
    error = data.get("error")
    if name != "error" and error is None:
        return None
    message = error.get("message") if isinstance(error, Mapping) else error
    return str(message or data.get("message") or "an error event")


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _refusal(base_url: str, response: httpx.Response) -> str:
    code = response.status_code
    try:
        detail = response.json().get("error", {}).get("message", "")
    except (ValueError, AttributeError):
        detail = response.text
    hint = {
        401: f"the API key was refused; set {KEY_ENV} to the server's key",
        403: "the API key may not use this model",
        404: "no such model or route on this server",
        429: "the server is rate-limiting; try again later",
    }.get(code, "the server failed" if code >= 500 else "the request was refused")
    detail = " ".join(str(detail).split())
    detail = detail if len(detail) <= DETAIL_CHARS else detail[: DETAIL_CHARS - 1] + "…"
    return f"{base_url} answered {code}: {hint}" + (f" ({detail})" if detail else "")
