"""Threads for torch work in the engine process: each piece of work gets one that ends with it.

Every thread that runs torch keeps an OpenMP team for as long as it lives, and once a process
holds more OpenMP threads than it has cores, libgomp lets them sleep between parallel regions
instead of spinning. A decoded token is hundreds of small parallel regions, so one idle thread
that once ran torch (a pooled worker that had built a precision, the loading thread indexing
the rest of a library) halved every reply after it: gptq4 gave 12 tok/s through the protocol
where the same engine gave 24 on its own. So work never goes to a pooled thread, and a thread
that waits (the background indexing between lessons) hands each piece to a new one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def start(run: Callable[[], object], name: str) -> threading.Thread:
    """``run()`` in a new daemon thread."""
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _future_of(call: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    start(run, name)
    return future


def briefly(call: Callable[[], T], name: str = "brief") -> T:
    """``call()`` in a new thread that ends with it; blocks, returns its result or raises."""
    return _future_of(call, name).result()


async def in_own_thread(call: Callable[[], T], name: str) -> T:
    """``call()`` in a new thread that ends with it, awaited from the event loop."""
    return await asyncio.wrap_future(_future_of(call, name))
