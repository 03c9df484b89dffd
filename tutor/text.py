"""Text from the model, content files or the learner, made safe to show in a terminal.

Control characters and escape sequences are removed (newlines and tabs stay), so
nothing a string carries can move the cursor, change colours or set a title.
Rendering it literally (never as Rich/Textual markup) is the widget's job.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

# CSI / OSC / other ESC sequences first, then any remaining C0/C1 control character.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (keeps \\n and \\t)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))


def when(timestamp: str, now: datetime | None = None) -> str:
    """An ISO timestamp (stored in UTC) as the learner says it, in local time: "today at 09:54",
    "yesterday at 17:02", "on 26 Nov at 10:00", "on 3 Jan 2025 at 08:15"."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    local = moment.astimezone()
    today = (now or datetime.now().astimezone()).astimezone(local.tzinfo).date()
    clock = local.strftime("%H:%M")
    if local.date() == today:
        return f"today at {clock}"
    if (today - local.date()).days == 1:
        return f"yesterday at {clock}"
    day = f"{local.day} {local.strftime('%b')}"
    return f"on {day} at {clock}" if local.year == today.year else f"on {day} {local.year} at {clock}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """The count with the word in the right number: "1 attempt", "0 attempts", "2 wrong answers"."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
