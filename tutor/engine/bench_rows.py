"""What ``quant-tutor bench`` measures: every precision on this machine, one row each.

For each precision, in the order given: ``switch_s`` is the first in-place switch to it (from
the previous precision, nothing prepared), ``reswitch_s`` a switch back to it once prepared,
``reload_s`` a fresh load from disk plus building that precision (what a switch would cost
without in-place switching), then greedy replies of ``--tokens`` tokens (``--rounds`` of them,
one by default) give ``ttft_s``, ``prefill_tok_s`` and ``decode_tok_s``, their medians
(``decode_runs``: each reply's). ``bound_tok_s`` is the measured memory read bandwidth
divided by the bytes of weights read per token: the speed if decoding were purely
bandwidth-bound. ``--plain`` adds ``plain_decode_tok_s``: transformers' own ``model.generate``
on the same model, prompt and precision, for contrast, and ``first_token_unlike_plain``: where
its greedy tokens first differ from the engine's (None: nowhere). ``--eager`` adds
``eager_decode_tok_s``: the same reply with eager decode steps (the Python loop), where the
engine replays CUDA graphs or runs the native step (None elsewhere: its steps are eager already).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tutor.engine.decode_profile import profile_decode
from tutor.engine.errors import EngineError
from tutor.engine.peer import decode_tok_s as peer_decode_tok_s
from tutor.engine.precisions import MEASURED
from tutor.engine.reports import MIB

if TYPE_CHECKING:
    from tutor.engine.engine import Engine
    from tutor.engine.peer import LlamaCpp
    from tutor.engine.reports import Reply

DEFAULT_PROMPT = "Explain in a few sentences what quantizing a neural network's weights to 4 bits does."
# A long grounded prompt: the tutor's system text, three passages and a question run to 250-370
# tokens on the shipped lessons; 600 is a tutor prompt with longer passages (issue 14's mark).
LONG_PROMPT_TOKENS = 600
# Timed reads of it per precision, after one that sets up: one read moved by 0.05-0.07 s from
# run to run here (int4 and gptq4, the same kernels, 0.45 and 0.38 s in one table), so the
# column is the median of these.
LONG_PROMPT_RUNS = 3
# transformers' generate is timed this many times per precision (its fastest is reported).
PLAIN_RUNS = 3
COLUMNS = (
    "precision",
    "device",
    "weights_mib",
    "switch_s",
    "reswitch_s",
    "reload_s",
    "ttft_s",
    "ttft_long_s",
    "prefill_tok_s",
    "decode_tok_s",
    "bound_tok_s",
)


def read_bandwidth_gbs(device: str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """Measured memory read bandwidth in GB/s: the best of ``repeats`` sums over a ``mib`` MiB buffer."""
    import torch

    buffer = torch.ones(mib * MIB // 4, dtype=torch.float32, device=device)
    cuda = buffer.device.type == "cuda"
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            buffer.sum()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    del buffer
    return mib * MIB / best / 1e9


def bytes_read_per_token(engine: Engine) -> int:
    """Weight bytes one decode step reads: every decoder weight once, plus the lm_head.

    With tied embeddings the lm_head *is* the embedding table, so this equals the weights'
    size; an untied embedding table is only looked up one row at a time and is left out.
    """
    weights = engine.weights()
    model = engine.model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and head is not None and embed.weight.data_ptr() != head.weight.data_ptr():
        scale = 2 if engine.precision == "fp32" and embed.weight.element_size() == 2 else 1
        return weights.weights_bytes - embed.weight.numel() * embed.weight.element_size() * scale
    return weights.weights_bytes


def plain_generate_tok_s(engine: Engine, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s of transformers' ``model.generate`` (greedy) at the engine's precision."""
    import torch

    model = engine.model
    if engine.precision == "fp32" and engine.decoder_kind == "fast":
        raise EngineError("plain generate at fp32 needs --generic (the fast path keeps its own fp32 copies)")
    ids = torch.tensor([prompt_ids], device=engine.torch_device)
    mask = torch.ones_like(ids)
    stamps: list[float] = []

    class Clock:  # a streamer that only timestamps each new token
        def put(self, value: Any) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=Clock(),
            pad_token_id=engine.tokenizer.pad_token_id or 0,
        )
    new = out[0, len(prompt_ids) :].tolist()
    # the streamer is fed the prompt first, then each new token
    token_stamps = stamps[1:]
    if len(token_stamps) < 2:
        return float("nan"), new
    return (len(token_stamps) - 1) / (token_stamps[-1] - token_stamps[0]), new


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _other(precision: str, order: Sequence[str]) -> str:
    for candidate in (*order, "bf16", "int8"):
        if candidate != precision:
            return candidate
    return "bf16"


def long_prompt_ids(engine: Engine, tokens: int = LONG_PROMPT_TOKENS) -> list[int]:
    """About ``tokens`` tokens of the lessons' quiz prose, in a chat turn: what a long grounded
    prompt costs to read (its words do not change the time, its length does)."""
    from tutor.engine.calibration import calibration_text

    def turn(passages: str) -> list[int]:
        return engine.encode(f"Answer from these passages.\n{passages}\nWhat do they say?")

    ids = engine.tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
    room = tokens - len(turn(""))
    return turn(engine.tokenizer.decode(ids[:room]))  # within a few tokens of the mark


def bench_rows(
    precisions: Sequence[str] = MEASURED,
    *,
    tokens: int = 64,
    device: str = "cpu",
    model: str | None = None,
    int8_threshold: float = 6.0,
    double_quant: bool = False,
    random_weights: bool = False,
    reload: bool = True,
    plain: bool = False,
    fast: bool = True,
    threads: int | None = None,
    prompt: str = DEFAULT_PROMPT,
    profile: bool = False,
    eager: bool = False,
    peer: str | None = None,
    long_prompt: int = LONG_PROMPT_TOKENS,
    rounds: int = 1,
    engine: Engine | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure each precision and return one dict per row (keys: ``COLUMNS`` and a few more).

    ``peer="llama.cpp"`` adds llama.cpp's row on the same GGUF file, prompt tokens, token count
    and threads (``tutor.engine.peer``), one of its replies after each of ours, and gives every
    row its decode speed as a multiple of the peer's (``decode_vs_peer``: the median of each
    pair's ratio). ``long_prompt`` tokens (0: none) give ``ttft_long_s``, the peer's too."""
    from tutor.engine.engine import Engine
    from tutor.engine.loading import preload_bitsandbytes

    say = log or (lambda _msg: None)
    options: dict[str, Any] = {
        "device": device,
        "int8_threshold": int8_threshold,
        "double_quant": double_quant,
        "fast": fast,
        "random_weights": random_weights,
        "threads": threads,
    }
    if random_weights:
        import torch

        # Random weights drive some activations subnormal, which real weights do not; CPUs
        # handle subnormals in slow microcode (here bf16 decode fell from ~45 to ~1 tok/s).
        # Flushing them keeps the timing about memory and kernels. Recorded in each row.
        torch.set_flush_denormal(True)
    if engine is None:
        say("loading the model")
        engine = Engine.load(model, **options)
    preload_bitsandbytes()  # a switch's time is quantizing, not a one-off import
    say(f"measuring memory bandwidth on {engine.device}")
    bandwidth = read_bandwidth_gbs(engine.device)
    prompt_ids = engine.encode(prompt)
    long_ids = long_prompt_ids(engine, long_prompt) if long_prompt else []
    engine.generate(prompt_ids=prompt_ids, max_new_tokens=2)  # warm-up: first-call costs are not decode speed
    # Opened before the first precision, so that a missing peer is said at once, not after minutes.
    other = _open_peer(peer, model, max(len(prompt_ids), len(long_ids)) + tokens + 8, say) if peer else None
    if other is not None:
        other.arrivals(prompt_ids, 2)  # its warm-up
    peer_replies: list[list[float]] = []
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        say(f"{precision}: switching")
        if engine.precision == precision:
            engine.switch(_other(precision, precisions), wait=True)
        engine.drop_prepared(precision)
        first = engine.switch(precision, wait=True)
        engine.switch(first.previous, wait=True)
        again = engine.switch(precision, wait=True)
        say(f"{precision}: generating {tokens} tokens" + (f", {rounds} times" if rounds > 1 else ""))
        replies, theirs = _replies(engine, prompt_ids, tokens, rounds, other)
        peer_replies += theirs
        reply = replies[0]  # greedy: every round's tokens are the same
        stats = reply.stats
        decode_runs = [r.stats.decode_tok_s for r in replies]
        long_ttft = None
        if long_ids:
            say(f"{precision}: a {len(long_ids)}-token prompt")
            engine.generate(prompt_ids=long_ids, max_new_tokens=1)  # a long prefill's first call sets up
            runs = [
                engine.generate(prompt_ids=long_ids, max_new_tokens=1).stats for _ in range(LONG_PROMPT_RUNS)
            ]
            timed = [run.ttft_s for run in runs if run.ttft_s is not None]  # None: it stopped at once
            long_ttft = statistics.median(timed) if timed else None
        per_token = bytes_read_per_token(engine)
        row: dict[str, Any] = {
            "precision": precision,
            "device": engine.device,
            "weights_mib": first.weights.weights_mib,
            "switch_s": round(first.seconds, 3),
            "reswitch_s": round(again.seconds, 4),
            "reload_s": None,
            "ttft_s": _median(r.stats.ttft_s for r in replies),
            "ttft_long_s": long_ttft,
            "long_prompt_tokens": len(long_ids) or None,
            "prefill_tok_s": _median(r.stats.prefill_tok_s for r in replies),
            "decode_tok_s": _median(decode_runs),
            "decode_runs": decode_runs,
            "rounds": rounds,
            "bound_tok_s": round(bandwidth * 1e9 / per_token, 1),
            "checkpoint": str(engine.checkpoint.path),
            "tokens": stats.tokens,
            "prompt_tokens": stats.prompt_tokens,
            "bandwidth_gbs": round(bandwidth, 1),
            "read_mib_per_token": round(per_token / MIB, 1),
            "quantized_modules": first.weights.quantized_modules,
            "kept_16bit": ", ".join(first.weights.kept_modules),
            "decoder": stats.decoder,
            "peak_rss_mib": stats.peak_rss_mib,
            "cuda_peak_mib": stats.cuda_peak_mib,
            "switched_from": first.previous,
            "threads": _threads(),
            "random_weights": random_weights,
        }
        if other is not None:
            row["engine"] = "quant-tutor"
            pairs = zip(decode_runs, map(peer_decode_tok_s, theirs), strict=True)
            ratios = [a / b for a, b in pairs if a and b]
            row["decode_vs_peer"] = round(statistics.median(ratios), 2) if ratios else None
        if eager:
            row["eager_decode_tok_s"] = _eager_decode_tok_s(engine, prompt_ids, tokens)
        if plain:
            say(f"{precision}: plain model.generate for contrast")
            try:
                # its fastest of a few runs, so the ratio to ours is not flattered: on a GPU one
                # run of the same generate decoded at 17 tok/s and a later one at 54
                plain_runs = [plain_generate_tok_s(engine, prompt_ids, tokens) for _ in range(PLAIN_RUNS)]
                rate, plain_tokens = max(plain_runs, key=lambda run: run[0])
            except EngineError:  # fp32 on the fast path lives outside the transformers model
                row["plain_decode_tok_s"] = row["first_token_unlike_plain"] = None
            else:
                row["plain_decode_tok_s"] = round(rate, 2)
                # Other kernels: a near-tie may flip a greedy pick (tests/engine/numerics.py), so this
                # is reported, not required.
                pairs = zip(plain_tokens, reply.tokens, strict=False)
                row["first_token_unlike_plain"] = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if profile:
            say(f"{precision}: profiling {tokens} tokens")
            row["profile_ms_per_token"] = profile_decode(engine, prompt_ids, tokens)["ms_per_token"]
        if reload:
            say(f"{precision}: reloading from disk for contrast")
            started = time.perf_counter()
            fresh = Engine.load(engine.checkpoint.path, precision=precision, **options)
            row["reload_s"] = round(time.perf_counter() - started, 3)
            fresh.close()
            del fresh
        rows.append(row)
    if other is not None:
        rows = [*rows, _peer_row(other, peer_replies, prompt_ids, long_ids, say)]
    return rows


def _eager_decode_tok_s(engine: Engine, prompt_ids: list[int], tokens: int) -> float | None:
    """The reply's decode speed with eager steps (the Python loop), where the engine replays CUDA
    graphs or runs the native step."""
    switch = "cuda_graphs" if engine.cuda_graphs else "native_step" if engine.native_step else None
    if switch is None:
        return None
    setattr(engine, switch, False)
    try:
        return _replies(engine, prompt_ids, tokens, 1, None)[0][0].stats.decode_tok_s
    finally:
        setattr(engine, switch, True)


def _replies(
    engine: Engine, prompt_ids: list[int], tokens: int, rounds: int, peer: LlamaCpp | None
) -> tuple[list[Reply], list[list[float]]]:
    """``rounds`` timed replies of ``tokens`` tokens after a short one that pays first-call costs,
    each followed by the peer's (its arrival times) where there is one: each pair sees the
    machine as it is in that moment (on a shared 2-core EPYC llama.cpp's speed moved from 64 to
    78 tok/s between two runs of the same bench)."""
    engine.generate(prompt_ids=prompt_ids, max_new_tokens=2)
    ours: list[Reply] = []
    theirs: list[list[float]] = []
    for _ in range(rounds):
        ours.append(engine.generate(prompt_ids=prompt_ids, max_new_tokens=tokens))
        if peer is not None:
            theirs.append(peer.arrivals(prompt_ids, tokens))
    return ours, theirs


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 4) if present else None


def _open_peer(peer: str, model: str | None, context_tokens: int, say: Callable[[str], None]) -> LlamaCpp:
    from pathlib import Path

    from tutor.engine.checkpoint import embedded_gguf_path
    from tutor.engine.peer import PEERS, open_llama_cpp

    if peer not in PEERS:
        raise EngineError(f"Unknown peer {peer!r}; choose one of: {', '.join(PEERS)}.")
    if model is not None and not str(model).endswith(".gguf"):
        raise EngineError("--peer llama.cpp reads a GGUF file: the embedded model, or --model FILE.gguf.")
    gguf = embedded_gguf_path() if model is None else Path(model)
    say(f"{peer}: loading {gguf.name}")
    return open_llama_cpp(gguf, context_tokens, _threads())


def _peer_row(
    peer: LlamaCpp,
    replies: list[list[float]],
    prompt_ids: list[int],
    long_ids: list[int],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The peer's row: its replies' medians, and its first token of the long prompt timed as
    the engine's is (the median of LONG_PROMPT_RUNS reads after one)."""
    from tutor.engine.peer import llama_cpp_row

    long_ttft = None
    if long_ids:
        say(f"{peer.gguf.name}: a {len(long_ids)}-token prompt")
        peer.arrivals(long_ids, 1)
        long_ttft = round(
            statistics.median(peer.arrivals(long_ids, 1)[0] for _ in range(LONG_PROMPT_RUNS)), 4
        )
    return llama_cpp_row(peer, replies, len(prompt_ids), long_ttft, len(long_ids) or None)
