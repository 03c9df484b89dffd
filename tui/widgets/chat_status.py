"""The tutor tab's status line: the model's state and precision, the precision keys, the index."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tui.tutor_runtime import TutorState
from tui.widgets.chat_precision import PRECISION_KEYS

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime


def badge_text(runtime: TutorRuntime) -> str:
    """The line above the chat: ready (with the keys that switch), loading, failed or stopped."""
    keys = "  ".join(f"{k.upper()} {p}" for k, p in PRECISION_KEYS.items())
    if runtime.ready:
        text = f"{runtime.badge()} · switch: {keys}"
        if runtime.indexing is not None:
            searched, total = runtime.indexing
            text += f"\nSearching {searched:,} of {total:,} lessons; the others are being indexed."
    elif runtime.state is TutorState.FAILED:
        text = f"The tutor's model could not load: {runtime.error}"
    elif runtime.state is TutorState.STOPPED:
        text = f"The tutor's engine stopped ({runtime.error}); your next question restarts it."
    else:
        doing = f" · {runtime.detail}" if runtime.detail else ""
        text = f"{runtime.badge()}{doing} — the lesson and quiz work meanwhile"
    return text
