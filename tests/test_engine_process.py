"""The engine process and its protocol: OpenAI clients, faults, two apps, a killed engine."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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
    server = subprocess.Popen(
        [sys.executable, "-m", "tui.entry", "serve", "--port", "0", "--cache-dir", str(model_cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        key = server.stdout.readline().split()[-1]
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
from tui.widgets.chat_view import ChatEntry, ChatView

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
