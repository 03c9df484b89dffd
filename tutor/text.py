"""Text from the model, content files or the learner, made safe to show in a terminal.

Control characters and escape sequences are removed (newlines and tabs stay), so
nothing a string carries can move the cursor, change colours or set a title.
Rendering it literally (never as Rich/Textual markup) is the widget's job.
"""

from __future__ import annotations

import re

# CSI / OSC / other ESC sequences first, then any remaining C0/C1 control character.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (keeps \\n and \\t)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))
