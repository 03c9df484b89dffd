"""The engine's lock: what keeps a reply, a switch, a build and a measurement from running into
each other (``Engine`` holds one; ``GptqCodes.calibrate`` holds it too)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tutor.engine.errors import EngineBusyError

BUSY_MESSAGE = "A reply is being generated; wait for it to finish or cancel it, then try again."


class EngineLock:
    """One holder at a time; the others wait for it or hear EngineBusyError."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    @contextlib.contextmanager
    def held(self, wait: bool | float) -> Iterator[None]:
        """Hold the lock inside: ``wait=True`` waits for it, ``False`` raises EngineBusyError
        at once when it is held, a number of seconds waits that long first."""
        if wait is True:
            acquired = self._lock.acquire()
        elif wait is False:
            acquired = self._lock.acquire(blocking=False)
        else:
            acquired = self._lock.acquire(timeout=float(wait))
        if not acquired:
            raise EngineBusyError(BUSY_MESSAGE)
        try:
            yield
        finally:
            self._lock.release()
