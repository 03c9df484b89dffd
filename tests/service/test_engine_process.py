"""The engine process and its protocol: OpenAI clients, faults, two apps, a killed engine."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tutor.engine.client import EngineClient, EngineRefused
from tutor.engine.process import EngineProcess
from tutor.engine.protocol import Event, parse_sse, precision_of
from tutor.service.server import ServeError, unix_socket

# --- the protocol, no model ----------------------------------------------------------------


def test_sse_events_are_parsed_with_names_json_and_comments() -> None:
    lines = [": keep-alive", "", "event: token", 'data: {"text": "Hi"}', "", "data: [DONE]", ""]
    assert list(parse_sse(iter(lines))) == [Event("token", {"text": "Hi"}), Event("message", "[DONE]")]


def test_model_ids_name_a_precision() -> None:
    assert precision_of("smollm2-135m-instruct:nf4", "bf16") == "nf4"
    assert precision_of("smollm2-135m-instruct", "int8") == "int8"
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        precision_of("smollm2-135m-instruct:int3", "bf16")


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "engine.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed engine leaves behind
    live = unix_socket(path)
    live.listen()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(ServeError, match="already listening"):
            unix_socket(path)
    finally:
        live.close()


def test_two_apps_get_two_private_engines(tmp_path: Path) -> None:
    first, second = EngineProcess(cache_dir=tmp_path / "a"), EngineProcess(cache_dir=tmp_path / "b")
    # The app spawns its engine before Textual starts and waits for its socket later.
    first.spawn()
    second.spawn()
    clients = [first.answering(), second.answering()]
    try:
        assert first.pid != second.pid and first.socket_path != second.socket_path
        for process, client in zip((first, second), clients, strict=True):
            assert process.folder is not None and process.socket_path is not None
            assert stat.S_IMODE(process.folder.stat().st_mode) == 0o700
            assert stat.S_IMODE(process.socket_path.stat().st_mode) == 0o600
            assert client.status()["state"] in ("loading", "ready")
        intruder = EngineClient("not-the-token", uds=first.socket_path)
        with pytest.raises(EngineRefused, match="API key"):
            intruder.status()
        intruder.close()
    finally:
        for client in clients:
            client.close()
        folders = [first.folder, second.folder]
        first.stop()
        second.stop()
    assert not any(folder is not None and folder.exists() for folder in folders), "stop cleans up"


# --- the openai package against the engine, and `quant-tutor serve` on a port ---------------

MODEL_IDS = [
    f"smollm2-135m-instruct:{p}"
    for p in ("fp32", "bf16", "int8", "nf4", "fp4", "int4", "gptq4", "int8-wo", "nf4-bf16")
]


@pytest.mark.model
def test_openai_client_streams_from_the_engine(engine_process: EngineProcess) -> None:
    """The `openai` package, unchanged, over the engine's socket (the app's own engine: the same
    server as `quant-tutor serve`, which the next test starts on a port)."""
    import openai

    transport = httpx.HTTPTransport(uds=str(engine_process.socket_path))

    def over_the_socket(key: str) -> openai.OpenAI:
        http = httpx.Client(transport=transport)
        return openai.OpenAI(base_url="http://engine/v1", api_key=key, http_client=http)

    client = over_the_socket(engine_process.token)
    assert [m.id for m in client.models.list()] == MODEL_IDS
    # The model id picks the precision: fp32 here (no quantizing, the fastest decode on any CPU).
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct:fp32",
        messages=[{"role": "user", "content": "What is 4-bit quantization?"}],
        max_tokens=24,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text.strip()
    last = chunks[-1]
    assert last.usage is not None and last.usage.completion_tokens <= 24
    assert last.model_extra is not None and last.model_extra["x_stats"]["precision"] == "fp32"

    # Closing a stream early cancels the reply: the engine is free again at once.
    early = client.chat.completions.create(
        model="smollm2-135m-instruct:bf16",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=200,
        stream=True,
    )
    next(iter(early))
    early.close()
    started = time.monotonic()
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct:bf16", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content and time.monotonic() - started < 20
    assert reply.model_extra is not None and reply.model_extra["x_stats"]["precision"] == "bf16"

    with pytest.raises(openai.AuthenticationError):
        over_the_socket("wrong").models.list()
    raw = httpx.Client(transport=transport, base_url="http://engine")
    bad = raw.post(
        "/qt/ask",
        json={"question": "What is NF4?", "max_sentences": 9},
        headers={"Authorization": f"Bearer {engine_process.token}"},
    )
    assert bad.status_code == 400 and "'max_sentences' must be a whole number from 1 to 3" in bad.text


def test_quant_tutor_serve_listens_on_a_port_with_a_key(model_cache: Path) -> None:
    """`quant-tutor serve` prints its URL and key and answers at once (the model loads behind);
    a second server on the same port says so in one line, no traceback."""
    server, url, key = _serve(model_cache)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        listed = httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert [m["id"] for m in listed.json()["data"]] == MODEL_IDS
        assert httpx.get(url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        port = url.rsplit(":", 1)[1].split("/")[0]
        taken = subprocess.run(
            [sys.executable, "-m", "tui.entry", "serve", "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 2 and "cannot listen" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        server.terminate()
        server.wait(timeout=20)


# --- the app when its engine is killed mid-reply ---------------------------------------------

KILL_SCRIPT = r"""
import asyncio, json, os, signal, sys
from pathlib import Path
from tutor.library.content import load_library
from tutor.progress.store import Store
from tui.app import QuantTutorApp
from tui.tutor_runtime import TutorRuntime
from tui.widgets.chat_entry import ChatEntry
from tui.widgets.chat_view import ChatView

async def until(pilot, condition, seconds=300):
    loop = asyncio.get_running_loop(); deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)
    await pilot.pause()

async def main():
    library = load_library(); store = Store()
    runtime = TutorRuntime(library, cache_dir=Path(sys.argv[1]))
    app = QuantTutorApp(library, store, tutor=runtime)
    out = {}
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("t")
        await until(pilot, lambda: runtime.ready)
        chat = app.screen.query_one(ChatView)
        await pilot.press(*"Why does int4 hit quality cliffs?", "enter")
        entry = chat.query(ChatEntry).last()
        model = entry.query_one(".chat-model")
        await until(pilot, lambda: str(model.visual).strip() != "")
        out["first_pid"] = runtime.process.pid
        os.kill(runtime.process.pid, signal.SIGKILL)
        stats = entry.query_one(".chat-stats")
        await until(pilot, lambda: "reply cut" in str(stats.visual), 30)
        out["cut_stats"] = str(stats.visual)
        out["cut_text"] = str(model.visual)
        out["badge"] = str(chat.query_one("#chat-badge").visual)
        out["entries_kept"] = len(chat.query(ChatEntry))
        await pilot.press(*"What is NF4?", "enter")
        await until(pilot, lambda: len(chat.query(ChatEntry)) == 2 and chat.query(ChatEntry).last().answer)
        second = chat.query(ChatEntry).last().answer
        out["second_grounded"] = second.grounded
        out["second_generated"] = second.generated
        out["second_pid"] = runtime.process.pid
        out["app_running"] = app.is_running
    runtime.stop()
    store.close()
    heavy = {"torch", "transformers", "sentence_transformers", "bitsandbytes"}
    out["heavy_imported"] = sorted(heavy & set(sys.modules))
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.model
def test_killed_engine_mid_reply_is_marked_cut_and_restarted(model_cache: Path, home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(model_cache)],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "QUANT_TUTOR_HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "reply cut" in out["cut_stats"] and "SIGKILL" in out["cut_stats"]
    assert out["cut_text"].strip() and out["entries_kept"] == 1, "what arrived stays on screen"
    assert "stopped" in out["badge"]
    assert out["second_pid"] != out["first_pid"], "the next question started a new engine"
    assert out["second_grounded"] and out["second_generated"]
    assert out["app_running"]
    assert out["heavy_imported"] == [], "the UI process never imported the model's libraries"


# --- the tutor on a remote engine (issue 13): generation over the OpenAI protocol ----------


@pytest.mark.model
def test_the_tutor_answers_through_a_remote_engine(engine_process: EngineProcess, shared_retriever) -> None:  # type: ignore[no-untyped-def]
    """The tutor's own ask (retrieval, quote, support check here) with the model behind the
    OpenAI protocol of a real engine process: its variants listed, a switch, a cancel."""
    from tutor.assistant.tutor_chat import ask
    from tutor.engine.remote import RemoteEngine, RemoteError

    transport = httpx.HTTPTransport(uds=str(engine_process.socket_path))
    http = httpx.Client(transport=transport, timeout=httpx.Timeout(10.0, read=120.0))
    remote = RemoteEngine.connect(
        "http://engine/v1", api_key=engine_process.token, precision="fp32", http=http
    )
    assert list(remote.variants) == [served.split(":")[1] for served in MODEL_IDS]
    question, lesson = "What does KL divergence measure?", "quantization-8bit-4bit"
    answer = ask(question, shared_retriever, remote, lesson, max_new_tokens=32)
    assert answer.grounded and answer.quote is not None and answer.generated.strip()
    assert answer.precision == "fp32" and answer.sentences, "checked against the lesson here"
    stats = answer.stats
    assert stats.device == "remote http://engine/v1" and 0 < stats.tokens <= 32 and stats.ttft_s
    assert stats.weights_mib is None and "weights – MiB" in stats.describe("fp32")
    remote.switch("int8-wo")  # another served variant: the server builds it for this request
    assert ask(question, shared_retriever, remote, lesson, max_new_tokens=8).precision == "int8-wo"
    stop = threading.Event()  # cancelled at the first token: the stream closes, the server stops
    reply = remote.generate(
        "Tell me a long story.", max_new_tokens=200, on_token=lambda _e: stop.set(), cancel=stop
    )
    assert reply.stats.stop_reason == "cancelled" and reply.text and reply.stats.tokens < 200
    started = time.monotonic()
    assert remote.generate("Hi", max_new_tokens=4).text and time.monotonic() - started < 20
    with pytest.raises(RemoteError, match="serves no variant for 'q3'; it serves: fp32, bf16"):
        remote.switch("q3")
    refused = RemoteEngine("http://engine/v1", remote.variants, "bf16", "wrong", http)
    with pytest.raises(
        RemoteError, match="answered 401: the API key was refused; set QUANT_TUTOR_REMOTE_KEY"
    ):
        refused.generate("Hi", max_new_tokens=2)


@pytest.mark.model
def test_the_cliff_is_estimated_from_a_servers_prompt_log_probabilities(  # type: ignore[no-untyped-def]
    engine_process: EngineProcess, shared_engine, library
) -> None:
    """`cliff --engine`: the server scores each window (an OpenAI completion with echo and
    logprobs); PPL is the local figure for the same tokens, KL an estimate that the cliff shows."""
    import math

    from tutor.engine.remote import RemoteEngine, RemoteError
    from tutor.lab.remote_estimate import estimate_rows, text_windows

    transport = httpx.HTTPTransport(uds=str(engine_process.socket_path))
    http = httpx.Client(transport=transport, timeout=httpx.Timeout(10.0, read=120.0))
    remote = RemoteEngine.connect(
        "http://engine/v1", api_key=engine_process.token, precision="fp32", http=http
    )
    rows = estimate_rows(remote, library, ["bf16", "fp4"], windows=2)
    assert remote.precision == "fp32", "the variant it had"
    bf16, fp4 = rows
    assert (bf16.precision, bf16.ppl_ratio, bf16.kl_estimate, bf16.same_top) == ("bf16", 1.0, 0.0, 1.0)
    assert fp4.tokens == bf16.tokens > 100 and fp4.kl_estimate > 0.02 and fp4.same_top < 0.95
    assert fp4.ppl_ratio > 1.05, "the 4-bit cliff shows in the estimate"
    # The same PPL from the local engine on the same tokens (the server read them at bf16).
    texts = text_windows(library)
    nll = tokens = 0.0
    shared_engine.switch("bf16", wait=True)
    for index in (len(texts) // 4, 3 * len(texts) // 4):  # pick_windows' two, spread over the text
        ids = shared_engine.tokenizer(texts[index], add_special_tokens=False)["input_ids"]
        logprobs = shared_engine.window_logprobs([ids], batch_size=1)[0, :-1]
        chosen = logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        half = len(chosen) // 2
        nll -= float(chosen[half:].sum())
        tokens += len(chosen) - half
    assert tokens == bf16.tokens and math.isclose(math.exp(nll / tokens), bf16.ppl, rel_tol=2e-3)
    with pytest.raises(RemoteError, match="serves no variant for q3"):
        estimate_rows(remote, library, ["q3"], windows=1)
    refused = http.post(
        "http://engine/v1/completions",
        headers={"Authorization": f"Bearer {engine_process.token}"},
        json={"model": "smollm2-135m-instruct:bf16", "prompt": "Hi there", "max_tokens": 16},
    )
    assert refused.status_code == 400 and "generate with /v1/chat/completions" in refused.text


def _serve(model_cache: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`quant-tutor serve` on a free port: the process, its URL and its key."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tui.entry", "serve", "--port", "0", "--cache-dir", str(model_cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    url = server.stdout.readline().split()[-1]
    key = server.stdout.readline().split()[-1]
    return server, url, key


@pytest.mark.model
async def test_the_app_asks_a_remote_engine_switches_its_variants_and_survives_its_death(
    model_cache: Path,
    library,
    store,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """`quant-tutor --engine URL` against a real `quant-tutor serve` over loopback: the app's own
    engine process keeps retrieval and the checks and sends generation to the server."""
    from tui.app import QuantTutorApp
    from tui.tutor_runtime import TutorRuntime
    from tui.widgets.chat_entry import ChatEntry
    from tui.widgets.chat_view import ChatView
    from tui.widgets.lab_view import LabView
    from tutor.engine.settings import EngineSettings

    server, url, key = _serve(model_cache)
    monkeypatch.setenv("QUANT_TUTOR_REMOTE_KEY", key)
    status = url.removesuffix("/v1") + "/qt/status"
    while httpx.get(status, headers={"Authorization": f"Bearer {key}"}).json()["state"] != "ready":
        time.sleep(0.2)
    runtime = TutorRuntime(library, cache_dir=model_cache, settings=EngineSettings(url))
    app = QuantTutorApp(library, store, tutor=runtime)

    async def until(condition, seconds: float = 120) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def asked(question: str, *, then=None, at_once=None) -> ChatEntry:  # type: ignore[no-untyped-def]
        """Ask; ``at_once()`` as soon as the question is shown, ``then()`` once text arrived."""
        chat.query_one("#chat-input").focus()
        await pilot.press(*question, "enter")
        await until(lambda: chat.query(ChatEntry) and chat.query(ChatEntry).last().question == question)
        entry = chat.query(ChatEntry).last()
        if at_once is not None:
            at_once()
        if then is not None:
            await until(lambda: str(entry.query_one(".chat-model").visual).strip() != "")
            then()
        await until(
            lambda: entry.answer is not None or "no answer" in str(entry.query_one(".chat-stats").visual)
        )
        return entry

    try:
        async with app.run_test(size=(110, 40)) as pilot:
            await pilot.press("t")
            await until(lambda: runtime.ready or runtime.error != "")
            assert runtime.ready, runtime.error
            chat = app.screen.query_one(ChatView)
            # The badge is redrawn when the UI handles the ready status, just after the flag.
            await until(lambda: "tutor bf16 · remote" in str(chat.query_one("#chat-badge").visual))
            first = (await asked("What does KL divergence measure?")).answer
            assert first is not None and first.grounded and first.generated.strip()
            assert first.precision == "bf16" and first.stats.device == f"remote {url}"
            assert "weights – MiB" in first.stats.describe()

            chat.action_switch("int8-wo")  # a served variant: the server builds it on its first request
            await until(lambda: runtime.switching is None and runtime.precision == "int8-wo")
            # Esc at once: a reply that reached its end before the cancel did would prove nothing.
            entry = await asked("What is NF4?", at_once=chat.action_cancel)
            assert entry.answer is not None and entry.answer.precision == "int8-wo"
            assert entry.answer.stats.cancelled and entry.answer.stats.tokens < 96

            await pilot.press("escape", "b", "m")
            lab = app.screen.query_one(LabView)
            await until(lambda: "local engine" in str(lab.query_one("#lab-status").visual))

            await pilot.press("t")
            entry = await asked("Why does a 4-bit model use less memory?", then=server.kill)
            assert entry.answer is not None and entry.answer.stats.stop.startswith("cut")
            assert entry.answer.generated.strip(), "what arrived stays"
            assert "✗ cut" in str(entry.query_one(".chat-stats").visual)
            entry = await asked("What does int8 keep?")
            assert "cannot reach the engine at " + url in str(entry.query_one(".chat-stats").visual)
            assert app.is_running
    finally:
        runtime.stop()
        server.kill()
        server.wait(timeout=20)


def _scripted_server(replies: list[tuple[int, bytes, int | None]]) -> tuple[str, list[str]]:
    """A tiny HTTP server answering each request with the next (status, body, length) in
    ``replies`` (length None: the body's own; more than the body: the connection is cut)."""
    import http.server
    import threading as th

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            asked = json.loads(self.rfile.read(length)).get("model") if length else None
            seen.append(self.path if asked is None else f"{self.path} {asked}")
            status, body, length = replies.pop(0)
            if asked is not None and self.headers.get("Content-Type") != "application/json":
                status, body, length = 415, b'{"error": {"message": "JSON bodies only"}}', None  # as FastAPI
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

        do_GET = do_POST = _answer

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", seen


def test_remote_faults_are_said_in_one_line_and_what_arrived_stays() -> None:
    from tutor.engine.remote import RemoteEngine, RemoteError, Variant, variants_from_ids

    chunk = b'data: {"choices": [{"delta": {"content": "Int8 is"}}]}\n\n'
    done = b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    busy = (503, b'{"error": {"message": "overloaded"}}', None)
    failed = b'event: error\ndata: {"message": "CUDA out of memory"}\n\n'
    url, seen = _scripted_server(
        [busy, busy, (200, chunk + done, None), (200, chunk, len(chunk) + 500)]
        + [(200, chunk + failed, None), (200, failed, None)]
        + [busy] * 3
    )
    remote = RemoteEngine(url, {"q8": Variant("m-q8")}, "q8", backoff_s=0.01)
    assert remote.generate("Hi").text == "Int8 is" and len(seen) == 3, "two 503s, then the reply"
    cut = remote.generate("Hi")  # the server closes mid-reply: what arrived stays, said cut
    assert cut.text == "Int8 is" and cut.stats.stop_reason.startswith("cut")
    # An error the server sends inside the stream: after text, a cut with its message; before
    # any, no answer.
    failing = remote.generate("Hi")
    assert failing.text == "Int8 is" and failing.stats.stop_reason == "cut (CUDA out of memory)"
    with pytest.raises(RemoteError, match="could not answer: CUDA out of memory"):
        remote.generate("Hi")
    with pytest.raises(RemoteError, match=r"answered 503: the server failed \(overloaded\)"):
        remote.generate("Hi")
    nobody = RemoteEngine("http://127.0.0.1:9/v1", {"q8": Variant("m")}, "q8", backoff_s=0.01)
    with pytest.raises(RemoteError, match=r"cannot reach the engine at http://127\.0\.0\.1:9/v1"):
        nobody.served()
    assert variants_from_ids(["m:bf16", "m:nf4", "llama3:8b-q4"]) == {
        "bf16": Variant("m:bf16"),
        "nf4": Variant("m:nf4"),
        "llama3:8b-q4": Variant("llama3:8b-q4"),
    }


def test_prompt_log_probabilities_shifted_by_one_place_are_refused() -> None:
    """llama-cpp-python's server scores each prompt token with the prediction made after it;
    those figures would make a PPL of thousands, so they are refused in one line."""
    from tutor.engine.remote import RemoteEngine, RemoteError, Variant

    tokens = [f" w{i}" for i in range(12)]
    text = "".join(tokens)

    def completion(shift: int) -> tuple[int, bytes, None]:
        tops = [None] + [{tokens[min(i + shift, 11)]: -0.5, " other": -2.0} for i in range(1, 12)]
        logprobs = {
            "tokens": tokens,
            "text_offset": [3 * i for i in range(12)],
            "token_logprobs": [None] + [-0.5 if not shift else -9.0] * 11,
            "top_logprobs": tops,
        }
        return 200, json.dumps({"choices": [{"text": text, "logprobs": logprobs}]}).encode(), None

    url, _seen = _scripted_server([completion(0), completion(1)])
    remote = RemoteEngine(url, {"bf16": Variant("m")}, "bf16", backoff_s=0.01)
    scores, lists = remote.prompt_logprobs(text, 5)
    assert scores == [-0.5] * 11 and lists[0] == {" w1": -0.5, " other": -2.0}
    with pytest.raises(RemoteError, match="shifted by one place"):
        remote.prompt_logprobs(text, 5)


def test_a_variant_on_a_server_of_its_own_is_asked_there() -> None:
    """One server per variant (vLLM serves one model per process): each reply goes to its own."""
    from tutor.engine.remote import RemoteEngine, Variant, check_variants

    reply = (200, b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n', None)
    first, first_seen = _scripted_server([reply])
    second, second_seen = _scripted_server([reply])
    variants = check_variants({"bf16": "m-16", "nf4": {"model": "m-4", "url": second + "/"}}, "test")
    assert variants == {"bf16": Variant("m-16"), "nf4": Variant("m-4", second)}
    remote = RemoteEngine(first, variants, "bf16", backoff_s=0.01)
    assert remote.generate("Hi").stats.device == f"remote {first}"
    assert "serves it as m-4" in remote.switch("nf4").describe() and second in remote.switch("nf4").describe()
    assert remote.generate("Hi").stats.device == f"remote {second}"
    assert first_seen == ["/v1/chat/completions m-16"] and second_seen == ["/v1/chat/completions m-4"]


@pytest.mark.model
def test_ask_says_in_one_line_when_the_remote_engine_fails_mid_session(  # type: ignore[no-untyped-def]
    shared_retriever, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quant-tutor ask --engine`: the server lists its models, then fails every completion."""
    from tutor import cli
    from tutor.cli import model

    monkeypatch.setattr(model, "load_retriever", lambda _library, _err: shared_retriever)
    models = (200, b'{"data": [{"id": "m:bf16"}]}', None)
    url, seen = _scripted_server([models] + [(500, b'{"error": {"message": "boom"}}', None)] * 3)
    assert cli.run(["ask", "What is NF4?", "--engine", url]) == 2
    err = capsys.readouterr().err
    assert f"{url} answered 500: the server failed (boom)" in err and "Traceback" not in err
    assert seen == ["/v1/models"] + ["/v1/chat/completions m:bf16"] * 3, "tried three times"
