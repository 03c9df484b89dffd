"""The model engine with the real embedded model, on CPU (issue 3).

They share the session's engine (``shared_engine`` in conftest.py: one conversion of the
embedded GGUF, one load); every test leaves it back at bf16. Few tokens per reply; no timing
assertions (speed is for ``quant-tutor bench``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tutor.engine import (
    EngineBusyError,
    ModelLoadError,
    ModelNotFoundError,
    SwitchError,
    TokenEvent,
)

pytestmark = pytest.mark.model

PROMPT = "What does quantization do to a neural network?"


# ``shared_engine`` (the engine, loaded once per session) and ``model_cache`` (the session's
# cache dir holding the converted checkpoint) come from tests/conftest.py.


@pytest.fixture
def engine(shared_engine):  # type: ignore[no-untyped-def]
    """The shared engine at bf16; put back to bf16 (and un-sabotaged) afterwards."""
    shared_engine.switch("bf16", wait=True)
    yield shared_engine
    shared_engine._manager.build_hook = None
    shared_engine.switch("bf16", wait=True)


@pytest.fixture(scope="module")
def bf16_tokens(shared_engine) -> list[int]:  # type: ignore[no-untyped-def]
    shared_engine.switch("bf16", wait=True)
    return shared_engine.generate(PROMPT, max_new_tokens=12).tokens


@pytest.fixture
def engine_home(tmp_path: Path, model_cache: Path) -> Path:
    """A QUANT_TUTOR_HOME whose cache is the session's model cache (for ``bench.main``)."""
    home = tmp_path / "bench-home"
    home.mkdir()
    (home / "cache").symlink_to(model_cache, target_is_directory=True)
    return home


def test_conversion_happens_once_and_is_reused(
    shared_engine, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from tutor.engine import checkpoint as ckpt

    first = shared_engine.checkpoint
    assert first.kind == "embedded"
    assert first.path.parent == model_cache / "models"
    assert ckpt.is_complete(first.path) and (first.path / ckpt.MANIFEST).is_file()
    siblings = sorted(p.name for p in first.path.parent.iterdir())
    assert siblings == [first.path.name]  # one conversion, no temporary folder left behind
    weights = first.path / ckpt.WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns
    conversions: list[object] = []
    monkeypatch.setattr(ckpt, "_write_conversion", lambda *args: conversions.append(args))
    again = ckpt.resolve_checkpoint(cache_dir=model_cache)
    assert not again.converted_now and again.path == first.path
    assert conversions == []
    assert weights.stat().st_mtime_ns == stamp


def test_engine_greedy_equals_plain_generate(engine) -> None:  # type: ignore[no-untyped-def]
    import torch

    ids = engine.encode(PROMPT)
    n = 16
    with torch.inference_mode():
        out = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    plain = [t for t in out[0, len(ids) :].tolist() if t not in engine.stop_ids]
    reply = engine.generate(prompt_ids=ids, max_new_tokens=n)
    assert engine.decoder_kind == "fast"
    assert reply.tokens == plain
    assert reply.text == engine.tokenizer.decode(plain, skip_special_tokens=True)


@pytest.mark.parametrize("precision", ["fp32", "int8", "nf4", "fp4"])
def test_each_precision_loads_and_generates(engine, precision: str) -> None:  # type: ignore[no-untyped-def]
    report = engine.switch(precision)
    assert engine.precision == precision == report.precision
    assert report.previous == "bf16"
    reply = engine.generate(PROMPT, max_new_tokens=4)
    assert len(reply.tokens) == 4
    assert reply.text.strip()
    stats = reply.stats
    assert stats.precision == precision
    assert stats.device == "cpu"
    assert stats.tokens == 4
    assert stats.ttft_s is not None and stats.ttft_s > 0
    assert stats.decode_tok_s is not None and stats.decode_tok_s > 0
    assert stats.prefill_tok_s is not None and stats.prefill_tok_s > 0
    assert stats.weights_mib == report.weights.weights_mib
    assert stats.peak_rss_mib >= stats.rss_mib > 0
    assert stats.cuda_peak_mib is None
    assert not stats.cancelled
    if precision in ("int8", "nf4", "fp4"):
        weights = report.weights
        assert weights.quantized_modules == weights.linear_modules == 30 * 7
        assert any("embedding/lm_head (tied, 49152x576)" in name for name in weights.kept_modules)
        assert weights.kept_bytes >= 49152 * 576 * 2
        expected = "Linear8bitLt" if precision == "int8" else "Linear4bit"
        assert type(engine.model.model.layers[0].mlp.down_proj).__name__ == expected
        assert type(engine.model.lm_head).__name__ == "Linear"


def test_weights_mib_ordered_fp32_bf16_int8_nf4(engine) -> None:  # type: ignore[no-untyped-def]
    sizes = {p: engine.switch(p).weights.weights_mib for p in ("fp32", "int8", "nf4", "fp4", "bf16")}
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["nf4"]
    assert sizes["nf4"] == sizes["fp4"]
    assert 250 < sizes["bf16"] < 265  # 134.5M parameters in bf16, tied embedding counted once


def test_round_trip_gives_back_the_first_bf16_tokens(engine, bf16_tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    master = engine.model.model.layers[3].self_attn.q_proj
    weight = master.weight.detach().clone()
    engine.switch("int8")
    assert engine.model.model.layers[3].self_attn.q_proj is not master
    engine.switch("nf4")
    back = engine.switch("bf16")
    assert back.from_cache
    assert engine.model.model.layers[3].self_attn.q_proj is master
    assert master.weight.equal(weight)
    assert engine.generate(PROMPT, max_new_tokens=12).tokens == bf16_tokens


def test_reswitch_to_prepared_precision_is_a_swap(engine) -> None:  # type: ignore[no-untyped-def]
    first = engine.switch("int8")
    engine.switch("bf16")
    again = engine.switch("int8")
    assert not first.from_cache or first.prepare_seconds == 0
    assert again.from_cache and again.prepare_seconds == 0
    assert "int8" in again.prepared and "bf16" in again.prepared
    assert again.prepared_bytes <= again.prepared_limit_bytes


def test_prepare_ahead_in_a_thread_makes_the_switch_a_swap(engine) -> None:  # type: ignore[no-untyped-def]
    engine.drop_prepared("fp4")
    done: list[object] = []
    worker = threading.Thread(target=lambda: done.append(engine.prepare("fp4")))
    worker.start()
    worker.join(120)
    assert done and engine.is_prepared("fp4") and engine.precision == "bf16"
    report = engine.switch("fp4")
    assert report.from_cache and report.prepare_seconds == 0


def test_failing_switch_keeps_the_old_precision_working(engine) -> None:  # type: ignore[no-untyped-def]
    engine.switch("int8")
    before = engine.generate(PROMPT, max_new_tokens=6).tokens
    engine.drop_prepared("fp4")

    def fail(precision: str) -> None:
        raise RuntimeError("CPU out of memory (simulated)")

    engine._manager.build_hook = fail
    with pytest.raises(SwitchError) as caught:
        engine.switch("fp4")
    assert "still running at int8" in str(caught.value)
    assert "memory" in str(caught.value)
    assert caught.value.kept == "int8"
    assert engine.precision == "int8"
    assert not engine.is_prepared("fp4")
    assert engine.generate(PROMPT, max_new_tokens=6).tokens == before


def test_failing_quantizer_keeps_the_old_precision(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from tutor.engine import quantize

    engine.drop_prepared("nf4")
    before = engine.generate(PROMPT, max_new_tokens=4).tokens
    calls = {"n": 0}
    real = quantize._codes

    def flaky(chunk, quant_type):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 20:  # fail part-way through, after some modules were built
            raise ValueError("bitsandbytes error (simulated)")
        return real(chunk, quant_type)

    monkeypatch.setattr(quantize, "_codes", flaky)
    with pytest.raises(SwitchError, match="bitsandbytes error"):
        engine.switch("nf4")
    assert engine.precision == "bf16"
    assert type(engine.model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert engine.generate(PROMPT, max_new_tokens=4).tokens == before


def test_cancellation_stops_within_one_token(engine) -> None:  # type: ignore[no-untyped-def]
    cancel = threading.Event()
    seen: list[TokenEvent] = []

    def on_token(event: TokenEvent) -> None:
        seen.append(event)
        if len(seen) == 3:
            cancel.set()

    reply = engine.generate(PROMPT, max_new_tokens=40, on_token=on_token, cancel=cancel)
    assert len(reply.tokens) == 3 == len(seen)
    assert reply.stats.cancelled and reply.stats.stop_reason == "cancelled"
    assert [e.index for e in seen] == [0, 1, 2]
    assert "".join(e.text for e in seen) == reply.text


def test_cancellation_from_another_thread(engine) -> None:  # type: ignore[no-untyped-def]
    cancel = threading.Event()
    counts: list[int] = []

    def on_token(event: TokenEvent) -> None:
        if event.index == 1:
            threading.Thread(target=cancel.set).start()
            time.sleep(0.05)  # the other thread sets the event while this token is in flight
        counts.append(event.index)

    reply = engine.generate(PROMPT, max_new_tokens=40, on_token=on_token, cancel=cancel)
    assert reply.stats.cancelled
    assert len(reply.tokens) <= 3  # the token in flight when cancel came, at most one more


def test_stream_iterator_matches_generate(engine, bf16_tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    with engine.stream(PROMPT, max_new_tokens=12) as stream:
        events = list(stream)
    assert stream.reply is not None
    assert [e.token_id for e in events] == bf16_tokens == stream.reply.tokens
    with engine.stream(PROMPT, max_new_tokens=30) as early:
        next(early)
    assert early.reply is not None and early.reply.stats.cancelled and len(early.reply.tokens) <= 2
    assert not engine.busy


def test_switch_during_a_reply_is_refused_or_waits(engine, bf16_tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    refused: list[str] = []

    def on_token(event: TokenEvent) -> None:
        if event.index == 0:
            with pytest.raises(EngineBusyError) as caught:
                engine.switch("int8")
            refused.append(str(caught.value))

    reply = engine.generate(PROMPT, max_new_tokens=12, on_token=on_token)
    assert refused and "being generated" in refused[0]
    assert reply.tokens == bf16_tokens
    assert engine.precision == "bf16"

    started = threading.Event()
    result: dict[str, object] = {}

    def slow_token(event: TokenEvent) -> None:
        started.set()
        time.sleep(0.01)

    def worker() -> None:
        result["reply"] = engine.generate(PROMPT, max_new_tokens=12, on_token=slow_token)

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(60)
    report = engine.switch("int8", wait=True)  # waits for the reply, then switches
    thread.join()
    assert report.precision == "int8"
    assert result["reply"].tokens == bf16_tokens  # type: ignore[attr-defined]


def test_zero_tokens_and_a_cancelled_start(engine) -> None:  # type: ignore[no-untyped-def]
    empty = engine.generate(PROMPT, max_new_tokens=0)
    assert empty.tokens == [] and empty.stats.stop_reason == "max_tokens" and empty.stats.ttft_s is None
    stopped = engine.generate(PROMPT, max_new_tokens=5, cancel=lambda: True)
    assert stopped.tokens == [] and stopped.stats.cancelled


def test_seeded_sampling_is_reproducible(engine) -> None:  # type: ignore[no-untyped-def]
    a = engine.generate(PROMPT, max_new_tokens=8, sample=True, seed=7, temperature=0.9)
    b = engine.generate(PROMPT, max_new_tokens=8, sample=True, seed=7, temperature=0.9)
    assert a.tokens == b.tokens
    assert "seed=7" in a.stats.sampling


def test_window_logits_agree_with_greedy_decoding(engine, bf16_tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    prompt = engine.encode(PROMPT)
    window = prompt + bf16_tokens
    logits = engine.window_logits([window, window], start=len(prompt) - 1)
    assert logits.shape == (2, len(window) - len(prompt) + 1, engine.model.config.vocab_size)
    predicted = logits[0, :-1].argmax(-1).tolist()
    agree = sum(p == t for p, t in zip(predicted, bf16_tokens, strict=True))
    assert agree >= len(bf16_tokens) - 1  # batched prefill vs cached decode: equal up to rare near-ties
    assert logits[0].equal(logits[1])
    engine.switch("nf4")
    quantized = engine.window_logprobs([window], start=len(prompt) - 1)
    assert quantized.shape[1:] == logits.shape[1:]
    assert not quantized[0].equal(logits[0].log_softmax(-1))


def test_generic_decode_loop_matches_the_fast_one(shared_engine, bf16_tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    import torch

    from tutor.engine import Engine
    from tutor.engine.decoder import GenericSession

    generic = Engine.load(shared_engine.checkpoint.path, fast=False, prepared_limit_bytes=0)
    assert generic.decoder_kind == "generic"
    assert generic.generate(PROMPT, max_new_tokens=12).tokens == bf16_tokens
    ids = generic.encode(PROMPT)
    session = GenericSession(generic.model, torch.device("cpu"), len(ids) + 6, static=True)
    with torch.inference_mode():
        tokens = [int(session.prefill(ids).argmax())]
        for _ in range(5):
            tokens.append(int(session.step(tokens[-1]).argmax()))
    assert tokens == bf16_tokens[:6]
    generic.switch("nf4")
    assert len(generic.generate(PROMPT, max_new_tokens=3).tokens) == 3
    generic.close()


def test_bench_rows_and_cli(
    shared_engine, engine_home: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import json

    from tutor.engine import bench

    rows = bench.bench_rows(["nf4", "bf16"], tokens=3, engine=shared_engine, reload=False)
    assert [r["precision"] for r in rows] == ["nf4", "bf16"]
    for row in rows:
        for column in bench.COLUMNS:
            assert column in row
        assert row["decode_tok_s"] > 0 and row["bound_tok_s"] > 0 and row["switch_s"] >= 0
        assert row["checkpoint"] == str(shared_engine.checkpoint.path)
    assert rows[0]["weights_mib"] < rows[1]["weights_mib"]
    assert shared_engine.precision == "bf16"
    monkeypatch.setenv("QUANT_TUTOR_HOME", str(engine_home))
    assert bench.main(["--precisions", "int8", "--tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["precision"] == "int8" and out[0]["reload_s"] > 0


def test_damaged_model_folder_gives_a_clear_error(shared_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from tutor.engine import Engine

    source = shared_engine.checkpoint.path
    broken = tmp_path / "broken-model"
    shutil.copytree(source, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="Could not load the model"):
        Engine.load(broken)
    with pytest.raises(ModelNotFoundError, match="No such model"):
        Engine.load(tmp_path / "nowhere.gguf")


def test_damaged_cache_is_detected_and_rebuilt(
    shared_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A truncated converted checkpoint fails the manifest check and is converted again.

    The conversion itself is replaced by a copy of the good folder to keep the test quick.
    """
    import shutil

    from tutor.engine import checkpoint as ckpt

    cache = tmp_path / "cache"
    source = shared_engine.checkpoint.path
    (cache / "models").mkdir(parents=True)
    copy = cache / "models" / source.name
    shutil.copytree(source, copy)
    assert ckpt.resolve_checkpoint(cache_dir=cache).path == copy
    (copy / ckpt.WEIGHTS_FILE).write_bytes(b"\0" * 100)
    assert not ckpt.is_complete(copy)
    written: list[Path] = []

    def fake_conversion(gguf: Path, out: Path, progress) -> None:  # type: ignore[no-untyped-def]
        written.append(out)
        for item in source.iterdir():
            shutil.copy2(item, out / item.name)

    monkeypatch.setattr(ckpt, "_write_conversion", fake_conversion)
    rebuilt = ckpt.resolve_checkpoint(cache_dir=cache)
    assert rebuilt.converted_now and rebuilt.path == copy and ckpt.is_complete(copy)
    assert written and written[0] != copy and not written[0].exists()  # written aside, renamed into place
