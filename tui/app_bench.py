"""``quant-tutor bench --app``: the Tutor tab's speed against ``quant-tutor ask``, side by side.

The CLI side runs ``quant-tutor ask --questions FILE --precision P --json`` (the model in the
command's own process). The app side drives the real app headless with Pilot, with its engine
process, asking the same questions at the same precisions. Both decode greedily, so each
question yields the same tokens on both sides; the table shows decode tok/s (decode tokens ÷
decode time, as the reply's stats line) and TTFT from each, their ratio, and how long a key
press took to switch tabs while one more reply streamed (its own, so redrawing the lesson tab
does not slow the timed replies).

With ``--rounds N`` the two sides take turns at each precision, the CLI's questions then the
app's, N times: this machine's speed drifted by 10-20 % within minutes, so a ratio is only
as good as the two figures are close in time. A figure is the median of its N replies and a
ratio the median of each round's ratio.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from textual.widgets import TabbedContent

from tui.app import QuantTutorApp
from tui.tutor_runtime import TutorRuntime, TutorState
from tui.widgets.chat_entry import ChatEntry
from tui.widgets.chat_view import ChatView
from tutor.engine.machine import describe
from tutor.library.content import load_library
from tutor.progress.store import Store

# Asked after the timed questions at each precision: the key presses ride on its reply, so
# the tabs they redraw cost the timed replies nothing.
KEYS_QUESTION = "Why does a 4-bit model use less memory?"
# Between key presses, as a quick hand presses them: pressed back to back, each key waited for
# the tab the one before it had just shown to be drawn (a maximum of 324 ms against 110).
KEY_GAP_S = 0.25
QUESTIONS = [
    "What does KL divergence measure?",
    "Is 4-bit good enough for a chatbot?",
    "Why is int8 called near-lossless?",
]


Stats = dict[str, Any]  # a reply's stats line (tutor.assistant.answer_stats), as JSON


def cli_stats(questions: list[str], precision: str, lesson_id: str) -> list[Stats]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(questions) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tui.entry",
            "ask",
            "--questions",
            handle.name,
            "--precision",
            precision,
            "--lesson",
            lesson_id,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    Path(handle.name).unlink()
    return [answer["stats"] for answer in json.loads(done.stdout)]


async def _until(condition: Any, seconds: float = 600, step: float = 0.05) -> None:
    # A plain sleep: Pilot's pause waits for the screen to settle, which would make this loop
    # render the app over and over and take the engine's cores.
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get there in time")
        await asyncio.sleep(step)


async def app_stats(
    questions: list[str], precisions: list[str], threads: int | None, lesson_id: str, rounds: int = 1
) -> tuple[dict[str, list[list[Stats]]], dict[str, list[list[Stats]]], float, list[float]]:
    """Per precision and round the app's reply stats of each question and the CLI's (asked just
    before them, while the app waits), the seconds until the tutor was ready, and the key-press
    latencies measured while replies streamed."""
    library = load_library()
    scratch = Path(tempfile.mkdtemp(prefix="quant-tutor-bench-"))
    store = Store(scratch / "progress.sqlite3")  # a scratch store: the learner's progress is not touched
    runtime = TutorRuntime(library, threads=threads)
    app = QuantTutorApp(library, store, lesson_id=lesson_id, tutor=runtime)
    mine: dict[str, list[list[Stats]]] = {}
    theirs: dict[str, list[list[Stats]]] = {}
    keys: list[float] = []

    async def ask(question: str) -> ChatEntry:
        await pilot.press("t")
        chat.query_one("#chat-input").focus()
        chat.query_one("#chat-input").value = question  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause(0.05)
        return chat.query(ChatEntry).last()

    async def answered(entry: ChatEntry) -> Stats:
        await _until(lambda: entry.answer is not None)
        assert entry.answer is not None
        return entry.answer.stats.as_dict()

    try:
        async with app.run_test(size=(110, 40)) as pilot:
            started = time.monotonic()
            await pilot.press("t")
            await _until(lambda: runtime.ready or runtime.state is TutorState.FAILED)
            if not runtime.ready:
                raise RuntimeError(f"the tutor could not load: {runtime.error}")
            ready_s = time.monotonic() - started
            chat = app.screen.query_one(ChatView)
            for precision in precisions:
                if runtime.precision != precision:
                    chat.action_switch(precision)
                    await _until(lambda: runtime.switching is None)
                mine[precision], theirs[precision] = [], []
                for round_ in range(rounds):
                    sys.stderr.write(f"{precision}, round {round_ + 1} of {rounds}: `ask`, then the app…\n")
                    theirs[precision].append(
                        await asyncio.to_thread(cli_stats, questions, precision, lesson_id)
                    )
                    mine[precision].append([await answered(await ask(question)) for question in questions])
                entry = await ask(KEYS_QUESTION)
                keys += await _press_keys_mid_reply(app, chat, entry)
                await answered(entry)
    finally:
        runtime.stop()
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return mine, theirs, ready_s, keys


async def _press_keys_mid_reply(app: QuantTutorApp, chat: ChatView, entry: ChatEntry) -> list[float]:
    """Switch to the lesson and back while ``entry``'s reply streams, timing each key until its
    tab is the active one (the frame that shows it is drawn at the next refresh)."""
    model = entry.query_one(".chat-model")
    await _until(lambda: entry.answer is not None or bool(str(model.visual).strip()))
    tabs = app.screen.query_one(TabbedContent)
    seconds: list[float] = []
    while entry.answer is None:
        app.screen.focus_next()  # off the question box (the Tutor tab focuses it), so letters switch tabs
        for key, tab in (("l", "lesson"), ("t", "tutor")):
            pressed = time.monotonic()
            app.simulate_key(key)
            await _until(lambda t=tab: tabs.active == t, 10, step=0.002)
            seconds.append(time.monotonic() - pressed)
            await asyncio.sleep(KEY_GAP_S)
    return seconds


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratios(mine: list[float | None], theirs: list[float | None]) -> list[float | None]:
    """Each round's app ÷ CLI, where both decoded."""
    return [a / b if a and b else None for a, b in zip(mine, theirs, strict=True)]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@click.command(
    "bench", help="The Tutor tab's decode speed and TTFT against `quant-tutor ask`, same questions."
)
@click.option(
    "--app",
    is_flag=True,
    expose_value=False,
    help="this bench (without it: the engine's `quant-tutor bench`)",
)
@click.option("--precisions", default="bf16,nf4", help="comma-separated (default: bf16,nf4)")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="turns of `ask` then the app at each precision; figures are medians, ratios paired by round",
)
@click.option("--threads", type=int, help="the app engine's torch threads (default: one per core)")
@click.option("--json", "as_json", is_flag=True, help="print the measurements as JSON")
def command(precisions: str, rounds: int, threads: int | None, as_json: bool) -> None:
    """``quant-tutor bench --app`` (``tui.entry`` hands it to ``tutor.cli`` for that flag)."""
    compare(precisions, threads, as_json, rounds)


def compare(precisions_text: str, threads: int | None, as_json: bool, rounds: int = 1) -> None:
    """Ask the same questions through `quant-tutor ask` and the app, in turns; print both side by side."""
    precisions = [p.strip() for p in precisions_text.split(",") if p.strip()]
    lesson_id = next(iter(load_library().lessons))  # both sides prefer this lesson's passages
    sys.stderr.write("Driving the Tutor tab headless, `quant-tutor ask` beside it…\n")
    app, cli, ready_s, keys = asyncio.run(app_stats(QUESTIONS, precisions, threads, lesson_id, rounds))
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        for at, question in enumerate(QUESTIONS):
            mine = [round_[at] for round_ in app[precision]]
            theirs = [round_[at] for round_ in cli[precision]]
            app_runs = [m["tokens_per_s"] for m in mine]
            cli_runs = [t["tokens_per_s"] for t in theirs]
            rows.append(
                {
                    "precision": precision,
                    "question": question,
                    "tokens": (mine[0]["tokens"], theirs[0]["tokens"]),
                    "app_tok_s": _median(app_runs),
                    "cli_tok_s": _median(cli_runs),
                    "app_vs_cli": _rounded(_median(_ratios(app_runs, cli_runs))),
                    "app_runs": app_runs,
                    "cli_runs": cli_runs,
                    "app_ttft_s": _median([m["ttft_s"] for m in mine]),
                    "cli_ttft_s": _median([t["ttft_s"] for t in theirs]),
                }
            )
    summary = {
        "machine": describe("cpu"),
        "rounds": rounds,
        "app_ready_s": round(ready_s, 2),
        "key_ms_median": None if not keys else round(1000 * statistics.median(keys), 1),
        "key_ms_p90": None if not keys else round(1000 * sorted(keys)[int(0.9 * len(keys))], 1),
        "key_ms_max": None if not keys else round(1000 * max(keys), 1),
        "rows": rows,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    medians = "" if rounds == 1 else f", medians of {rounds} rounds in turns"
    table = Table(
        title=f"Tutor tab vs `quant-tutor ask` (same questions, greedy{medians})",
        caption="mean: the questions' mean tok/s and TTFT; its ratio is the median of every pair's",
    )
    for column in [
        "precision",
        "question",
        "tokens app/CLI",
        "app tok/s",
        "CLI tok/s",
        "app ÷ CLI",
        "app TTFT s",
        "CLI TTFT s",
    ]:
        table.add_column(column, justify="left" if column in ("precision", "question") else "right")
    for row in rows:
        table.add_row(
            row["precision"],
            row["question"],
            "{}/{}".format(*row["tokens"]),
            _cell(row["app_tok_s"]),
            _cell(row["cli_tok_s"]),
            _cell(row["app_vs_cli"], 2),
            _cell(row["app_ttft_s"], 3),
            _cell(row["cli_ttft_s"], 3),
        )
    for precision in precisions:
        mine = [r for r in rows if r["precision"] == precision]
        paired = [ratio for r in mine for ratio in _ratios(r["app_runs"], r["cli_runs"])]
        table.add_row(
            precision,
            "mean",
            "",
            _cell(_mean([r["app_tok_s"] for r in mine])),
            _cell(_mean([r["cli_tok_s"] for r in mine])),
            _cell(_median(paired), 2),
            _cell(_mean([r["app_ttft_s"] for r in mine]), 3),
            _cell(_mean([r["cli_ttft_s"] for r in mine]), 3),
        )
    console = Console()
    console.print(table)
    console.print(
        f"App: tutor ready {summary['app_ready_s']} s after the Tutor tab opened (warm cache); "
        f"a key press during a reply (one every {KEY_GAP_S} s) switched tabs in "
        f"{summary['key_ms_median']} ms median, {summary['key_ms_p90']} ms at the 90th percentile, "
        f"{summary['key_ms_max']} ms at most ({len(keys)} presses)."
    )
    console.print(f"Machine: {summary['machine']}")
