"""Asks before unfinished work is set aside: keep it (the default, Esc) or discard it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button

from tui.widgets.plain import Plain


class ConfirmDiscard(ModalScreen[bool]):
    """Dismissed with True only when the learner chose to discard."""

    BINDINGS = [
        Binding("escape,k", "keep", "Keep it"),
        Binding("d", "discard", "Discard"),
    ]

    def __init__(self, question: str, keep: str, discard: str) -> None:
        super().__init__()
        self.question = question
        self.keep_label = keep
        self.discard_label = discard

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Plain(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self.keep_label} (k)", id="keep", variant="primary")
                yield Button(f"{self.discard_label} (d)", id="discard", variant="error")

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()  # Enter keeps: discarding takes a deliberate key

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "discard")

    def action_keep(self) -> None:
        self.dismiss(False)

    def action_discard(self) -> None:
        self.dismiss(True)
