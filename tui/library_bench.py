"""``python -m tui.library_bench``: what a library of many lessons costs, against the four shipped ones.

It writes a generated library of N lessons (:mod:`tutor.library.sample_library`) and a 4-lesson one,
then, for each, in fresh processes under a fresh ``QUANT_TUTOR_HOME``:

* ``quant-tutor --content DIR lessons --json``, cold (no library index cached) and warm;
* the app's first paint (headless, through Pilot: from the process's spawn until the study
  screen has been drawn), the Library and Progress tabs opened, and the UI process's peak
  resident memory;
* the first tutor answer: the app's engine process spawned with no lesson index cached (the
  converted model is linked from the user's cache when it is there, so only the index is
  fresh), from the spawn until it is ready and until its answer to one question about the
  generated copy of the seed lesson (one sentence of the model's; the same three lessons are
  indexed before ready in both libraries: that lesson and its two related ones).

Each figure is one run; the ratios N ÷ 4 are what the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tutor.library.sample_library import generate_library

SIZE = (100, 30)
# The 4th generated lesson is a copy of the seed lesson in every library (tutor.library.sample_library).
ASKED_LESSON = 3
QUESTION = "Is 4-bit good enough for a chatbot?"


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout


def _env(home: Path) -> dict[str, str]:
    import os

    return {**os.environ, "QUANT_TUTOR_HOME": str(home)}


def measure(content: Path, home: Path) -> dict[str, float]:
    """One library's figures, each from its own process."""
    env = _env(home)
    lessons = [sys.executable, "-m", "tui.entry", "--content", str(content), "lessons", "--json"]
    cold, _ = _timed(lessons, env)
    warm, _ = _timed(lessons, env)
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "tui.library_bench", "--paint", str(content)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    figures = json.loads(child.stdout.splitlines()[-1])
    figures["first_paint_s"] = figures.pop("painted_at") - start
    return {"lessons_json_cold_s": cold, "lessons_json_warm_s": warm, **figures}


def first_answer(lesson_id: str, content: Path, home: Path, models: Path) -> dict[str, float]:
    """Spawn the engine with a cache holding no lesson index and ask one question about
    ``lesson_id``: seconds from the spawn to ready and to the answer."""
    import os
    import uuid

    from tutor.engine.process import EngineProcess

    cache = home / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if models.is_dir() and not (cache / "models").exists():
        (cache / "models").symlink_to(models, target_is_directory=True)
    os.environ["QUANT_TUTOR_HOME"] = str(home)  # the child's library index: warm, as the app leaves it
    process = EngineProcess(content=content, lesson=lesson_id, cache_dir=cache)
    start = time.perf_counter()
    client = process.start()
    try:
        while (status := client.status())["state"] != "ready":
            if status["state"] == "failed":
                raise RuntimeError(f"the engine failed: {status['error']}")
            time.sleep(0.05)
        ready = time.perf_counter() - start
        request = uuid.uuid4().hex
        for event in client.ask(
            QUESTION, lesson_id=lesson_id, precision="bf16", request_id=request, max_sentences=1
        ):
            if event.name == "error":
                raise RuntimeError(f"the engine could not answer: {event.data['message']}")
            if event.name == "answer":
                break
        answered = time.perf_counter() - start
        searched = client.status()["index"]["lessons"]
    finally:
        client.close()
        process.stop()
    return {"engine_ready_s": ready, "first_answer_s": answered, "lessons_searched_then": searched}


def paint(content: Path) -> dict[str, float]:
    """In the child: open the app headless, wait for its first screen, then open the Library
    and Progress tabs; report the wall clock at first paint, how long each tab took and the
    peak resident memory."""
    import asyncio
    import resource

    from tui.app import QuantTutorApp
    from tutor.library.content import load_library
    from tutor.progress.store import Store

    async def run() -> dict[str, float]:
        app = QuantTutorApp(load_library(content), Store())
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            painted_at = time.perf_counter()
            opened = {}
            for key, name in (("r", "library_tab_s"), ("g", "progress_tab_s")):
                start = time.perf_counter()
                await pilot.press(key)
                await pilot.pause()
                opened[name] = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"painted_at": painted_at, **opened, "peak_rss_mib": peak_kib / 1024}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui.library_bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lessons", type=int, default=1600, help="lessons in the big library (default: %(default)s)"
    )
    parser.add_argument("--paint", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.paint:
        figures = paint(args.paint)
        print(json.dumps(figures))  # perf_counter is system-wide on Linux: the parent can subtract
        return 0
    from tutor.paths import cache_dir

    models = cache_dir() / "models"  # the user's own, before QUANT_TUTOR_HOME points elsewhere
    with tempfile.TemporaryDirectory(prefix="qt-library-bench-") as temp:
        results = {}
        for count in (4, args.lessons):
            content, home = Path(temp) / f"lib{count}", Path(temp) / f"home{count}"
            ids = generate_library(content, count)
            results[count] = measure(content, home)
            results[count].update(first_answer(ids[ASKED_LESSON], content, home, models))
    small, large = results[4], results[args.lessons]
    print(f"{'figure':<22}{'4 lessons':>12}{f'{args.lessons} lessons':>16}{'ratio':>8}")
    for name in small:
        print(f"{name:<22}{small[name]:>12.3f}{large[name]:>16.3f}{large[name] / small[name]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
