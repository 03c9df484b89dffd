"""The tutor's precisions, switched live: their keys, when a switch is refused, and the switch
itself (in a worker thread: the engine builds the precision while the app stays responsive)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work

from tui.messages import TutorStatus
from tutor.engine.client import EngineGone, EngineRefused

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime
    from tui.widgets.chat_view import ChatView

# fp32, nf4-bf16 (nf4's weights stored in 16 bits: "no way back"), the int4 kernel's int4 and
# gptq4 (the Lab's "calibration") and weight-only int8 (beside int8) are for trying, not for
# every day: their keys work but stay off the footer.
PRECISION_KEYS = {
    "f5": "bf16",
    "f6": "int8",
    "shift+f6": "int8-wo",
    "f7": "nf4",
    "f8": "fp4",
    "f9": "fp32",
    "f10": "nf4-bf16",
    "f11": "int4",
    "f12": "gptq4",
}


def switch_refused(runtime: TutorRuntime, precision: str) -> str | None:
    """Why switching to ``precision`` now does nothing (said to the learner), or None to switch."""
    if not runtime.ready:
        return "The model is not loaded yet."
    if runtime.switching:
        return f"Already switching to {runtime.switching}."
    if runtime.precision == precision:
        return f"Already at {precision}."
    return None


@work(thread=True, group="switch")
def switch(chat: ChatView, precision: str) -> None:
    """Switch the engine to ``precision``; the chat notifies how it went and the app redraws the badge."""
    runtime = chat.runtime
    client = runtime.client
    assert client is not None
    try:
        report = client.switch(precision)  # the engine builds it now; a reply in flight finishes first
        runtime.precision, runtime.weights_mib = precision, report["weights_mib"]
        message, severity = report["describe"], "information"
    except EngineRefused as exc:
        message, severity = f"Switch to {precision} failed; still at {runtime.precision}. {exc}", "error"
    except EngineGone as exc:
        runtime.connection_lost(str(exc))
        message, severity = f"Switch to {precision} failed: {runtime.error}", "error"
    runtime.switching = None
    chat.app.call_from_thread(chat.notify, message, title="Precision", severity=severity, timeout=8)
    chat.app.post_message(TutorStatus())
