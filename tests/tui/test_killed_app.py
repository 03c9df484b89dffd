"""The real ``quant-tutor`` app in a pseudo-terminal, killed with SIGKILL in the middle of a quiz.

A Pilot app that exits cleanly proves nothing about a crash: here the console script runs as a
learner starts it, three answers are typed as keys, the process is killed outright, and what
the store kept is read back by a new app. Its engine child (started once the lesson is drawn)
must not outlive it either.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import SEED
from tui.app import QuantTutorApp
from tui.widgets.plain import Plain
from tui.widgets.quiz_view import QuizView
from tutor.library.content import Library
from tutor.progress.database import default_path
from tutor.progress.store import Store

COLUMNS, LINES = 110, 40


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _answered(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM answers").fetchone()[0])
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0


async def test_sigkill_mid_quiz_keeps_the_answers_and_resumes_at_question_4(
    library: Library, home: Path, model_cache: Path
) -> None:
    # The engine child reads the session's converted model (converting it first if no test did).
    home.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(model_cache, target_is_directory=True)
    db = default_path()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)}
    app = subprocess.Popen(
        [str(Path(sys.executable).with_name("quant-tutor")), "--lesson", SEED],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    screen = bytearray()

    def drain() -> None:  # the app blocks once the terminal's buffer is full
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            screen.extend(chunk)

    threading.Thread(target=drain, daemon=True).start()
    engine: list[psutil.Process] = []
    try:
        _until("the lesson to be drawn", lambda: b"Quiz" in screen)
        os.write(master, b"q")
        time.sleep(0.5)
        os.write(master, b"\r")
        _until("question 1", lambda: b"Question 1 of 10" in screen)
        lesson = library.get(SEED)
        for done, question in enumerate(lesson.questions[:3]):
            os.write(master, question.answer.encode())
            # Enter only once the answer is in: an Enter that overtakes it is "answer first".
            _until(f"answer {done + 1} to be saved", lambda n=done + 1: _answered(db) == n)
            os.write(master, b"\r")
            _until(f"question {done + 2}", lambda n=done + 2: f"Question {n} of 10".encode() in screen)
        engine = psutil.Process(app.pid).children(recursive=True)
        sockets = [c.cmdline()[c.cmdline().index("--uds") + 1] for c in engine if "--uds" in c.cmdline()]
        app.send_signal(signal.SIGKILL)
        assert app.wait(timeout=10) == -signal.SIGKILL
    finally:
        if app.poll() is None:
            app.kill()
        os.close(master)
    assert engine, "the app had started its engine process"
    _, alive = psutil.wait_procs(engine, timeout=15)
    assert not alive, f"the engine outlived the killed app: {alive}"
    private = [Path(socket).parent for socket in sockets]
    assert private and not any(folder.exists() for folder in private), "the engine removed its folder"

    store = Store(db)
    try:
        kept = store.open_attempt(SEED)
        assert kept is not None and len(kept.answers) == 3
        typed = {q.id: q.answer for q in lesson.questions[:3]}
        assert {q: a.choice for q, a in kept.answers.items()} == typed
        assert kept.unanswered[0] == lesson.questions[3].id
    finally:
        store.close()

    again = Store(db)
    resumed = QuantTutorApp(library, again)
    try:
        async with resumed.run_test(size=(80, 24)) as pilot:
            await pilot.press("q")
            quiz = resumed.screen.query_one(QuizView)
            assert "unfinished quiz" in quiz.body_text and "3 of 10 answered" in quiz.body_text
            await pilot.press("enter")
            assert "Question 4 of 10" in str(resumed.screen.query_one("#quiz-status", Plain).visual)
    finally:
        again.close()
