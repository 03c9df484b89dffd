"""The UI process's objects and Python's cyclic garbage collector."""

from __future__ import annotations

import gc


def settle() -> None:
    """Leave every object alive now out of the cyclic collector's full passes.

    A full pass walks every tracked object, and the app's widgets, styles and parsed lessons are
    most of them. Without this, `bench --app` saw 14 full passes, 13 of them over 20 ms and the
    longest 162 ms, in the middle of replies, and a key press that landed on one waited for it.
    Freezing after the first frame took the longest to 52 ms. Frozen objects are still freed
    when nothing refers to them; only a cycle among them waits for the process to end.
    """
    gc.freeze()
