"""Start and stop the app's own engine process (no torch here: the app imports this).

Each app gets its own engine: a child ``python -m tutor.service.server`` listening on a Unix
socket inside a fresh private folder (mode 0700; the socket 0600), with a random token in
its environment. The child reads its stdin until it closes, so it exits with the app, even
when the app is killed. Its output goes to ``engine.log`` in that folder, never to the
terminal the app draws on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tutor.engine.client import EngineClient, EngineGone
from tutor.engine.protocol import TOKEN_ENV
from tutor.engine.settings import EngineSettings

PRIVATE_PREFIX = "quant-tutor-engine-"  # the engine's private folder (socket and log)
START_TIMEOUT_S = 60.0  # until the socket answers; loading the model is reported separately


class EngineStartError(Exception):
    """The engine process could not be started; the message carries the end of its log."""


@dataclass
class EngineProcess:
    model: str | None = None
    device: str = "cpu"
    content: Path | None = None
    lesson: str | None = None  # the lesson the learner has open (its passages are indexed first)
    cache_dir: Path | None = None
    threads: int | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)  # local, or a server that generates
    folder: Path | None = None
    token: str = field(default="", repr=False)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self, socket_path: Path) -> list[str]:
        command = [sys.executable, "-m", "tutor.service.server", "--uds", str(socket_path), "--watch-stdin"]
        for flag, value in [
            ("--model", self.model),
            ("--device", self.device),
            ("--content", self.content),
            ("--lesson", self.lesson),
            ("--cache-dir", self.cache_dir),
            ("--threads", self.threads),
        ]:
            if value is not None:
                command += [flag, str(value)]
        return command + self.settings.flags()

    def start(self) -> EngineClient:
        """Start the child and return a client once its socket answers (the model may still load)."""
        self.spawn()
        return self.answering()

    def spawn(self) -> None:
        """Start the child and return at once (``answering`` waits for its socket)."""
        self.stop()
        folder = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX))
        token = secrets.token_urlsafe(24)
        with open(folder / "engine.log", "wb") as log:
            self.popen = subprocess.Popen(
                self.command(folder / "engine.sock"),
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, TOKEN_ENV: token},
                start_new_session=True,  # the terminal's signals are the app's to handle
            )
        self.folder, self.token = folder, token

    def answering(self) -> EngineClient:
        """A client of the spawned child once its socket answers."""
        socket_path = self.socket_path
        assert socket_path is not None, "spawn() first"
        client = self.connect()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if not self.alive():
                client.close()
                raise EngineStartError(f"the engine process {self.exit_description()}: {self.log_tail()}")
            if socket_path.exists():
                with contextlib.suppress(EngineGone):
                    client.status()
                    return client
            if time.monotonic() > deadline:
                client.close()
                self.stop()
                raise EngineStartError(f"the engine did not answer within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    @property
    def socket_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "engine.sock"

    def connect(self) -> EngineClient:
        """A new client of the running engine."""
        return EngineClient(self.token, uds=self.socket_path)

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def alive(self, settle_s: float = 0.0) -> bool:
        """Whether the child runs; ``settle_s`` waits that long for one that may be exiting."""
        if self.popen is None:
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(settle_s)
        return self.popen.poll() is None

    def exit_description(self) -> str:
        code = None if self.popen is None else self.popen.poll()
        if code is None:
            return "is running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
            return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def log_tail(self, lines: int = 3) -> str:
        if self.folder is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.folder / "engine.log").read_text(encoding="utf-8", errors="replace")
            return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"
        return "(no log)"

    def stop(self) -> None:
        """Stop the child (closing its stdin asks it to exit; then SIGTERM, then SIGKILL)."""
        popen, self.popen = self.popen, None
        if popen is not None:
            with contextlib.suppress(OSError):
                if popen.stdin is not None:
                    popen.stdin.close()
            for ask in (None, popen.terminate, popen.kill):
                if ask is not None:
                    with contextlib.suppress(OSError):
                        ask()
                try:
                    popen.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
