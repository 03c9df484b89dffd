"""Shown instead of the study screen while the terminal is smaller than 80×24."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Center, Middle
from textual.screen import ModalScreen

from tui.widgets.plain import Plain

MIN_WIDTH, MIN_HEIGHT = 80, 24


class TooSmallScreen(ModalScreen[None]):
    def compose(self) -> ComposeResult:
        with Middle(), Center():
            yield Plain(
                f"Terminal too small: quant-tutor needs at least {MIN_WIDTH}×{MIN_HEIGHT}.\n"
                "Make the window bigger to continue. Ctrl+Q quits; your progress is saved.",
                id="too-small-text",
            )
