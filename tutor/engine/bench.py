"""``quant-tutor bench``: the click command: it measures every precision (``bench_rows``) and
prints the rows as tables (``bench_table``) or as JSON."""

from __future__ import annotations

import json
import sys

import click

from tutor.engine.bench_rows import DEFAULT_PROMPT, LONG_PROMPT_TOKENS, bench_rows
from tutor.engine.bench_table import render_profile, render_table
from tutor.engine.errors import EngineError
from tutor.engine.precisions import MEASURED, parse_precisions


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
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    help="timed replies per precision, each followed by the peer's with --peer; decode tok/s is their "
    "median and × peer the median of each pair's ratio (default: 1)",
)
@click.option("--profile", is_flag=True, help="also break each decoded token's time down by kind of work")
@click.option(
    "--eager",
    is_flag=True,
    help="also decode with eager steps (the Python loop) where the engine replays CUDA graphs (a GPU) "
    "or runs the native step (a CPU), for contrast",
)
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
    eager: bool,
    peer: str | None,
    rounds: int,
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
            eager=eager,
            peer=peer,
            long_prompt=long_prompt,
            rounds=rounds,
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
