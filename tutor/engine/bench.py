"""``quant-tutor bench``: measure every precision on this machine, one row each.

For each precision, in the order given: ``switch_s`` is the first in-place switch to it (from
the previous precision, nothing prepared), ``reswitch_s`` a switch back to it once prepared,
``reload_s`` a fresh load from disk plus building that precision (what a switch would cost
without in-place switching), then one greedy reply of ``--tokens`` tokens gives ``ttft_s``,
``prefill_tok_s`` and ``decode_tok_s``. ``bound_tok_s`` is the measured memory read bandwidth
divided by the bytes of weights read per token: the speed if decoding were purely
bandwidth-bound. ``--plain`` adds ``plain_decode_tok_s``: transformers' own ``model.generate``
on the same model, prompt and precision, for contrast, and ``first_token_unlike_plain``: where
its greedy tokens first differ from the engine's (None: nowhere).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from tutor.engine.decode_profile import COLUMNS as PROFILE_COLUMNS
from tutor.engine.decode_profile import profile_decode
from tutor.engine.errors import EngineError
from tutor.engine.precisions import MEASURED, parse_precisions
from tutor.engine.reports import MIB

if TYPE_CHECKING:
    from tutor.engine.engine import Engine

DEFAULT_PROMPT = "Explain in a few sentences what quantizing a neural network's weights to 4 bits does."
# A long grounded prompt: the tutor's system text, three passages and a question run to 250-370
# tokens on the shipped lessons; 600 is a tutor prompt with longer passages (issue 14's mark).
LONG_PROMPT_TOKENS = 600
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
    peer: str | None = None,
    long_prompt: int = LONG_PROMPT_TOKENS,
    engine: Engine | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure each precision and return one dict per row (keys: ``COLUMNS`` and a few more).

    ``peer="llama.cpp"`` adds llama.cpp's row on the same GGUF file, prompt tokens, token count
    and threads (``tutor.engine.peer``), and gives every row its decode speed as a multiple of
    the peer's (``decode_vs_peer``). ``long_prompt`` tokens (0: none) give ``ttft_long_s``."""
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
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        say(f"{precision}: switching")
        if engine.precision == precision:
            engine.switch(_other(precision, precisions), wait=True)
        engine.drop_prepared(precision)
        first = engine.switch(precision, wait=True)
        engine.switch(first.previous, wait=True)
        again = engine.switch(precision, wait=True)
        say(f"{precision}: generating {tokens} tokens")
        engine.generate(prompt_ids=prompt_ids, max_new_tokens=2)
        reply = engine.generate(prompt_ids=prompt_ids, max_new_tokens=tokens)
        stats = reply.stats
        long_ttft = None
        if long_ids:
            say(f"{precision}: a {len(long_ids)}-token prompt")
            engine.generate(prompt_ids=long_ids, max_new_tokens=1)  # a long prefill's first call sets up
            long_ttft = engine.generate(prompt_ids=long_ids, max_new_tokens=1).stats.ttft_s
        per_token = bytes_read_per_token(engine)
        row: dict[str, Any] = {
            "precision": precision,
            "device": engine.device,
            "weights_mib": first.weights.weights_mib,
            "switch_s": round(first.seconds, 3),
            "reswitch_s": round(again.seconds, 4),
            "reload_s": None,
            "ttft_s": stats.ttft_s,
            "ttft_long_s": long_ttft,
            "long_prompt_tokens": len(long_ids) or None,
            "prefill_tok_s": stats.prefill_tok_s,
            "decode_tok_s": stats.decode_tok_s,
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
        if plain:
            say(f"{precision}: plain model.generate for contrast")
            try:
                rate, plain_tokens = plain_generate_tok_s(engine, prompt_ids, tokens)
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
    if peer is not None:
        rows = _with_peer(rows, peer, model, prompt_ids, tokens, say)
    return rows


def _with_peer(
    rows: list[dict[str, Any]],
    peer: str,
    model: str | None,
    prompt_ids: list[int],
    tokens: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    from pathlib import Path

    from tutor.engine.checkpoint import embedded_gguf_path
    from tutor.engine.peer import PEERS, llama_cpp_row

    if peer not in PEERS:
        raise EngineError(f"Unknown peer {peer!r}; choose one of: {', '.join(PEERS)}.")
    if model is not None and not str(model).endswith(".gguf"):
        raise EngineError("--peer llama.cpp reads a GGUF file: the embedded model, or --model FILE.gguf.")
    gguf = embedded_gguf_path() if model is None else Path(model)
    say(f"{peer}: generating {tokens} tokens from {gguf.name}")
    theirs = llama_cpp_row(gguf, prompt_ids, tokens, _threads())
    for row in (*rows, theirs):
        row.setdefault("engine", "quant-tutor")
        ours, base = row.get("decode_tok_s"), theirs["decode_tok_s"]
        row["decode_vs_peer"] = round(ours / base, 2) if ours and base else None
    return [*rows, theirs]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"
    return str(value)


HEADERS = {
    "precision": "prec",
    "device": "dev",
    "weights_mib": "weights\nMiB",
    "switch_s": "switch\ns",
    "reswitch_s": "resw\ns",
    "reload_s": "reload\ns",
    "ttft_s": "ttft\ns",
    "ttft_long_s": "ttft\nlong s",
    "prefill_tok_s": "prefill\ntok/s",
    "decode_tok_s": "decode\ntok/s",
    "bound_tok_s": "bound\ntok/s",
    "plain_decode_tok_s": "plain\ntok/s",
    "decode_vs_peer": "decode\n× peer",
}


def render_table(rows: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    extra = [c for c in ("plain_decode_tok_s", "decode_vs_peer") if any(c in r for r in rows)]
    table = Table(
        title="quant-tutor bench",
        caption=_caption(rows),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in (*COLUMNS, *extra):
        header = HEADERS[column]
        table.add_column(
            header,
            justify="left" if column in ("precision", "device") else "right",
            min_width=max(len(part) for part in header.split("\n")),
            no_wrap=True,
        )
    for row in rows:
        cells = {c: _fmt(row.get(c)) for c in (*COLUMNS, *extra)}
        if row.get("engine", "quant-tutor") != "quant-tutor":  # the peer's row names its engine
            cells["precision"] = f"{row['engine']} {row['precision']}"
        table.add_row(*cells.values())
    return table


def render_profile(rows: list[dict[str, Any]]) -> Any:
    """Milliseconds per decoded token by kind of work, one row per precision (``--profile``)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="Where a decoded token's time goes (ms per token, under torch.profiler)",
        caption="Operators' own CPU time by kind (bnb: bitsandbytes' quantized kernels); outside ops: "
        "the rest of the wall time (Python between operators, the decode loop). The profiler slows "
        "operators a little, so its total is above the bare decode time (1000 / decode tok/s).",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("prec", no_wrap=True)
    short = {"attention": "attn", "sampling": "sample", "profiled total": "profiled\ntotal"}
    for kind in (*PROFILE_COLUMNS, "profiled total", "bare"):
        header = short.get(kind, kind.replace(" ", "\n"))
        table.add_column(header, justify="right", no_wrap=True, min_width=max(map(len, header.split("\n"))))
    for row in rows:
        shares = row.get("profile_ms_per_token")
        if not shares:
            continue
        rate = row.get("decode_tok_s")
        table.add_row(
            row["precision"],
            *(f"{shares[kind]:.2f}" for kind in PROFILE_COLUMNS),
            f"{sum(shares.values()):.2f}",
            "-" if not rate else f"{1000 / rate:.2f}",
        )
    return table


def _caption(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    first = rows[0]
    return (
        "switch: first in-place switch from the row above; resw: switching to it again once prepared; "
        "reload: fresh load from disk + quantize; bound: read bandwidth / weight bytes per token; "
        f"ttft long: the first token of a {first.get('long_prompt_tokens') or '-'}-token prompt. "
        f"Checkpoint {first['checkpoint']}; {first['prompt_tokens']}-token prompt, {first['tokens']} new "
        f"tokens, greedy, {first.get('threads')} threads; read bandwidth {first['bandwidth_gbs']} GB/s; "
        "kept in 16-bit when quantized: "
        f"{next((r['kept_16bit'] for r in rows if r.get('kept_16bit')), '-')}"
        + "".join(
            f"; × peer: decode tok/s over {r['engine']}'s ({r['peer_version']}, the {r['precision']} GGUF "
            f"as shipped, loaded in {r['load_s']} s)"
            for r in rows
            if r.get("engine", "quant-tutor") != "quant-tutor"
        )
    )


@click.command(
    "bench",
    help="Measure memory, switch time and speed of each precision on this machine.",
    epilog="`quant-tutor bench --app`: the app's Tutor tab against `quant-tutor ask` instead "
    "(`quant-tutor bench --app --help`).",
)
@click.option(
    "--precisions", default=",".join(MEASURED), help=f"comma-separated (default: {','.join(MEASURED)})"
)
@click.option("--tokens", type=int, default=64, help="new tokens per reply (default: 64)")
@click.option("--device", default="cpu", help="cpu or cuda (default: cpu)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array instead of a table")
@click.option("--model", help="local folder, .gguf file or hub id (default: embedded)")
@click.option("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold (default: 6.0)")
@click.option("--double-quant", is_flag=True, help="4-bit: also quantize the absmax scales")
@click.option("--random-weights", is_flag=True, help="same architecture, random weights")
@click.option("--no-reload", is_flag=True, help="skip the reload-from-disk contrast")
@click.option("--plain", is_flag=True, help="also time transformers' model.generate")
@click.option("--generic", is_flag=True, help="use the generic decode loop, not the fast one")
@click.option("--threads", type=int, help="torch intra-op threads (default: torch's)")
@click.option("--prompt", default=DEFAULT_PROMPT, help="the user message to answer")
@click.option(
    "--long-prompt",
    type=int,
    default=LONG_PROMPT_TOKENS,
    help=f"tokens of the long prompt whose first token is timed (default: {LONG_PROMPT_TOKENS}; 0: skip)",
)
@click.option("--profile", is_flag=True, help="also break each decoded token's time down by kind of work")
@click.option(
    "--peer",
    type=click.Choice(["llama.cpp"]),
    help="also decode the same GGUF with llama.cpp, in the same run (`make bench-peer` installs it)",
)
@click.pass_context
def command(
    ctx: click.Context,
    precisions: str,
    tokens: int,
    device: str,
    as_json: bool,
    model: str | None,
    threshold: float,
    double_quant: bool,
    random_weights: bool,
    no_reload: bool,
    plain: bool,
    generic: bool,
    threads: int | None,
    prompt: str,
    long_prompt: int,
    profile: bool,
    peer: str | None,
) -> None:
    """``quant-tutor bench`` (``tutor.cli`` imports this module only when it runs)."""
    from rich.console import Console

    if tokens < 2:
        raise click.BadParameter(
            "must be at least 2 (decode speed needs two tokens)", param_hint="'--tokens'"
        )
    err = Console(stderr=True)
    try:
        rows = bench_rows(
            parse_precisions(precisions),
            tokens=tokens,
            device=device,
            model=model,
            int8_threshold=threshold,
            double_quant=double_quant,
            random_weights=random_weights,
            reload=not no_reload,
            plain=plain,
            fast=not generic,
            threads=threads,
            prompt=prompt,
            profile=profile,
            peer=peer,
            long_prompt=long_prompt,
            log=None if as_json else (lambda msg: err.print(f"[dim]{msg}[/dim]")),
        )
    except EngineError as exc:
        err.print(f"quant-tutor bench: {exc}")
        ctx.exit(1)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        Console().print(render_table(rows))
        if profile:
            Console().print(render_profile(rows))


if __name__ == "__main__":  # pragma: no cover
    command(prog_name="quant-tutor bench")
