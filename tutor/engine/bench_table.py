"""``quant-tutor bench``'s tables: the measured rows (``bench_rows``) as rich tables, one with a
column per measurement, one with each decoded token's time by kind of work (``--profile``)."""

from __future__ import annotations

from typing import Any

from tutor.engine.bench_rows import COLUMNS
from tutor.engine.decode_profile import COLUMNS as PROFILE_COLUMNS


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
    "eager_decode_tok_s": "eager\ntok/s",
    "plain_decode_tok_s": "plain\ntok/s",
    "decode_vs_peer": "decode\n× peer",
}


def render_table(rows: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    extra = [
        c for c in ("eager_decode_tok_s", "plain_decode_tok_s", "decode_vs_peer") if any(c in r for r in rows)
    ]
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
        caption="Operators' own CPU time by kind (bnb: bitsandbytes' quantized kernels, or the native "
        "matvec on their codes where bitsandbytes has no kernel for this CPU); outside ops: "
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
        + (
            f"ttft long: the first token of a {first['long_prompt_tokens']}-token prompt (median of three). "
            if first.get("long_prompt_tokens")
            else ""
        )
        + f"Checkpoint {first['checkpoint']}; {first['prompt_tokens']}-token prompt, {first['tokens']} new "
        f"tokens, greedy, {first.get('threads')} threads; read bandwidth {first['bandwidth_gbs']} GB/s; "
        "kept in 16-bit when quantized: "
        f"{next((r['kept_16bit'] for r in rows if r.get('kept_16bit')), '-')}"
        + (
            "; eager: the same reply with eager decode steps (the Python loop) instead of CUDA graph "
            "replays or the native step"
            if any(r.get("eager_decode_tok_s") is not None for r in rows)
            else ""
        )
        + "".join(
            f"; × peer: decode tok/s over {r['engine']}'s ({r['peer_version']}, the {r['precision']} GGUF "
            f"as shipped, loaded in {r['load_s']} s)"
            + (
                f", the median of {first['rounds']} rounds' ratios (our reply, then its)"
                if first.get("rounds", 1) > 1
                else ""
            )
            for r in rows
            if r.get("engine", "quant-tutor") != "quant-tutor"
        )
    )
