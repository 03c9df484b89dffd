"""Shared fixtures: every test gets its own QUANT_TUTOR_HOME, so no test touches real progress."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from inspect import isclass
from pathlib import Path

import pytest
from textual.app import App
from textual.command import DiscoveryHit, Hit
from textual.pilot import Pilot

from tui.tutor_runtime import TutorRuntime
from tutor.engine.memory import cpu_count
from tutor.library.content import Library, load_library
from tutor.paths import HOME_ENV, cache_dir
from tutor.progress.store import Store

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist (make test) each worker gets its share of the cores for torch, here and in
# the engine processes it starts: two workers at torch's default of one thread per core would
# oversubscribe the machine, and torch's spinning threads then slow each other down many times.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // workers)))
SEED = "quantization-8bit-4bit"
# The user's cache, read before this run points QUANT_TUTOR_HOME elsewhere (pytest-xdist's workers
# inherit that, so it reaches them by a variable of its own): `make install` (its `quant-tutor
# warm`) built the native extension, converted the model and indexed the lessons there.
_USER_CACHE_ENV = "QUANT_TUTOR_TEST_USER_CACHE"
if _USER_CACHE_ENV not in os.environ:
    os.environ[_USER_CACHE_ENV] = str(cache_dir())
USER_CACHE = Path(os.environ[_USER_CACHE_ENV])
# Whatever runs outside a test's own home (a session fixture, such as the engine process, starts
# before the ``home`` fixture applies) gets this throwaway one: the engine process measured the
# Lab into the user's cache and read the user's settings until it did.
_RUN_HOME = tempfile.mkdtemp(prefix="qt-run-home-")
atexit.register(shutil.rmtree, _RUN_HOME, ignore_errors=True)
os.environ[HOME_ENV] = _RUN_HOME


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "qt-home"
    monkeypatch.setenv("QUANT_TUTOR_HOME", str(path))
    monkeypatch.delenv("NO_COLOR", raising=False)
    return path


@pytest.fixture(scope="session")
def library() -> Library:
    return load_library()


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    store = Store()
    yield store
    store.close()


async def until(pilot: Pilot[None], condition: Callable[[], object], seconds: float = 300) -> None:
    """Wait for ``condition`` in a running app, then let its screen settle once.

    Plain sleeps while waiting: a Pilot pause waits for the screen each time, which keeps the
    app rendering and takes cores from the engine process the test is waiting on.
    """
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)
    await pilot.pause()


class UnloadedTutor(TutorRuntime):
    """A tutor runtime that never starts its engine: the Tutor and Lab tabs stay "not loaded".

    For tests of layout and text that open those tabs without the model (opening them starts
    the real engine otherwise). The real loading, streaming and switching are tested with the
    real engine process in test_chat.py.
    """

    def load(self, changed: Callable[[], None], lesson_id: str | None = None) -> None:
        return None


async def palette(app: App[None]) -> dict[str, DiscoveryHit | Hit]:
    """What the command palette lists when it opens on the app's screen, by title: each provider
    of the app's COMMANDS and the screen's, asked as the palette asks them (discover)."""
    hits: dict[str, DiscoveryHit | Hit] = {}
    for source in [*app.COMMANDS, *app.screen.COMMANDS]:
        provider = (source if isclass(source) else source())(app.screen)
        async for hit in provider.discover():
            assert hit.text is not None
            hits[hit.text] = hit
    return hits


# --- the real model and index, loaded once per test session (CPU) ---------------------


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the converted embedded checkpoint and the lesson index.

    Its native extension's build is one for the whole run: under pytest-xdist each worker has a
    cache of its own, and each built the extension (60-115 s on a 2-core AVX2 EPYC, both
    workers compiling at once). In a folder they share, the second waits on the first's build
    lock and loads what it built, as a second app on one machine does; and where `make install`
    has built it already, neither builds. The conversion and the index `make install` made are
    copied in too (each worker converted, 11 s, and indexed, 20 s, on its own before); tests of
    converting and indexing make their own.
    """
    from tutor.engine.checkpoint import converted_dir_for, embedded_gguf_path, is_complete
    from tutor.engine.native_step import build_key

    cache = tmp_path_factory.mktemp("model-cache")
    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # the run's folder, above each worker's own
    native = run / "native-build"
    native.mkdir(exist_ok=True)
    (cache / "native").symlink_to(native, target_is_directory=True)
    build = Path("native") / f"decode_step-{build_key()}"
    _copy_installed(build, cache, lambda made: any(made.glob("*.so")))
    converted = converted_dir_for(embedded_gguf_path(), USER_CACHE).relative_to(USER_CACHE)
    _copy_installed(converted, cache, is_complete)
    _copy_installed(Path("index"), cache, Path.is_dir)
    return cache


def _copy_installed(made: Path, cache: Path, usable: Callable[[Path], bool]) -> None:
    """What `make install` made in the user's cache at ``made`` (a folder named by the digest of
    what it depends on, or the index, whose files are), copied to the same place in ``cache``
    when it is ``usable``; without it the tests make their own. Copied whole, then renamed: the
    other worker may be looking for the native build at that moment."""
    installed, target = USER_CACHE / made, cache / made
    if target.exists() or not installed.is_dir() or not usable(installed):
        return
    staging = target.parent / f".{target.name}-{os.getpid()}"
    shutil.copytree(installed, staging)
    try:
        staging.rename(target)
    except OSError:  # the other worker's copy got there first
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_engine(model_cache: Path):  # type: ignore[no-untyped-def]
    from tutor.engine import Engine

    return Engine.load(cache_dir=model_cache)


@pytest.fixture(scope="session")
def shared_retriever(model_cache: Path, library: Library):  # type: ignore[no-untyped-def]
    from tutor.assistant.retrieval import Retriever

    return Retriever.load(library, cache_dir=model_cache)


@pytest.fixture
def bf16_engine(shared_engine):  # type: ignore[no-untyped-def]
    """The shared engine at bf16, put back to bf16 after the test."""
    shared_engine.switch("bf16", wait=True)
    yield shared_engine
    shared_engine.switch("bf16", wait=True)


# --- the real engine process (what the app talks to), started once per test session ---------


@pytest.fixture(scope="session")
def engine_process(model_cache: Path):  # type: ignore[no-untyped-def]
    import time

    from tutor.engine.process import EngineProcess

    process = EngineProcess(cache_dir=model_cache)
    client = process.start()
    deadline = time.monotonic() + 600
    try:
        while (state := client.status()["state"]) != "ready":
            assert state != "failed", client.status()["error"]
            assert time.monotonic() < deadline, "the engine process did not get ready"
            time.sleep(0.2)
    finally:
        client.close()
    yield process
    process.stop()


@pytest.fixture
def engine_runtime(library: Library, engine_process):  # type: ignore[no-untyped-def]
    """A tutor runtime attached to the shared engine process, ready, at bf16."""
    from tui.tutor_runtime import TutorRuntime

    runtime = TutorRuntime(library, process=engine_process, keep_engine=True)
    runtime.load(lambda: None)
    assert runtime.ready, runtime.error
    if runtime.client is not None and runtime.client.status()["precision"] != "bf16":
        runtime.client.switch("bf16")
    yield runtime
    runtime.stop()


# --- figures a test measured, printed at the end of the run (the evaluation sets) -----------

# A test records them as a user property ("measured", text); the property travels with its
# report, so under pytest-xdist the figures reach the controller that prints the summary.
MEASURED = "measured"
_measured: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _measured.extend(str(value) for name, value in report.user_properties if name == MEASURED)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for text in _measured:
        terminalreporter.write_sep("-", "measured")
        terminalreporter.write_line(text)


# --- the longest files first ----------------------------------------------------------------

# Under pytest-xdist (--dist loadfile) each file runs whole on one worker, handed out in collection
# order as workers free up. In alphabetical order the Lab tab's file started last and one worker
# ran 358 s of tests against the other's 291 s; handing out the longest files first leaves the
# short ones to even out the end (342 s and 318 s). Grouping the files that share a session
# fixture on one worker (--dist loadgroup) balanced the workers exactly but ran slower in all
# (6 min 29 s against 5 min 42 s): the two heaviest groups then ran side by side throughout.
LONGEST_FIRST = (
    "test_measure.py",
    "test_engine_model.py",
    "test_lab_tab.py",
    "test_chat.py",
    "test_engine_process.py",
    "test_evaluation.py",
    "test_library_scale.py",
    "test_tui.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
