"""The tutor tab: questions answered from the lesson, the model's explanation streamed beside it.

Every answer leads with the lesson's own words (quoted, always right), then the model's
explanation labelled with the precision that wrote it, each sentence checked against the
lesson, the cited passage, and the measured stats (one entry each: chat_entry.py). Replies stream
from the engine in a worker (chat_reply.py); the learner switches precision live (F5–F12,
chat_precision.py) without losing the conversation; the line above says the tutor's state
(chat_status.py).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Input

from tui import heap
from tui.messages import TutorStatus
from tui.tutor_runtime import TutorState
from tui.widgets.chat_entry import DOUBT_STEP, ChatEntry, DoubtsMarked
from tui.widgets.chat_precision import PRECISION_KEYS, switch, switch_refused
from tui.widgets.chat_reply import (
    ReplyCut,
    ReplyFailed,
    ReplyFinished,
    ReplyPrepared,
    ReplyWaiting,
    TokenStreamed,
    answer,
)
from tui.widgets.chat_status import badge_text
from tui.widgets.plain import Plain
from tutor.engine.precisions import MEASURED
from tutor.library.models import Lesson
from tutor.progress.store import Store
from tutor.text import clean, plural

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime


class ChatView(Vertical):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel / leave"),
        *[Binding(key, f"switch('{p}')", p, show=p in MEASURED) for key, p in PRECISION_KEYS.items()],
        Binding("ctrl+r", "ask_again", "Ask again"),
        Binding("up", "history(-1)", "Previous question", show=False),
        Binding("down", "history(1)", "Next question", show=False),
    ]

    def __init__(self, lesson: Lesson, store: Store, runtime: TutorRuntime, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.store = store
        self.runtime = runtime
        self.history: list[str] = []
        self._history_at = 0
        self._pending: tuple[str, int | None] | None = None
        self._step: int | None = None
        self.reply_id: str | None = None  # the reply in flight, by its request id
        self.last: tuple[str, int | None] | None = None

    def compose(self) -> ComposeResult:
        yield Plain(id="chat-badge")
        model = "the small local model's" if self.runtime.remote is None else f"{self.runtime.remote}'s"
        with VerticalScroll(id="chat-log"):
            yield Plain(
                f"Curious about “{self.lesson.title}”? Ask anything about this lesson. "
                "I'll answer using just what you're reading — short, friendly, grounded. "
                f"The lesson's own words come first; {model} explanation follows, "
                "checked against the lesson.",
                classes="chat-intro",
            )
        yield Input(
            placeholder="Ask about this lesson… (Enter asks, ↑/↓ history)",
            id="chat-input",
        )

    def on_mount(self) -> None:
        self.update_badge()

    # --- status --------------------------------------------------------------------

    def update_badge(self) -> None:
        runtime = self.runtime
        self.query_one("#chat-badge", Plain).show(badge_text(runtime))
        if runtime.ready and self._pending is not None:
            question, step = self._pending
            self._pending = None
            self.ask(question, step)

    # --- asking --------------------------------------------------------------------

    def prefill(self, question: str, step: int | None) -> None:
        box = self.query_one("#chat-input", Input)
        box.value = question
        box.focus()
        self._step = step

    def on_input_submitted(self, event: Input.Submitted) -> None:
        question = clean(event.value).strip()
        if not question:
            return
        event.input.value = ""
        if not self.history or self.history[-1] != question:
            self.history.append(question)
        self._history_at = len(self.history)
        step, self._step = self._step, None
        self.ask(question, step)

    def ask(self, question: str, step: int | None = None, note: str = "") -> None:
        self.last = (question, step)
        if self.runtime.engine_died():
            self.app.post_message(TutorStatus())
        if not self.runtime.ready:
            if self.runtime.state is TutorState.FAILED:
                self.notify(f"The tutor's model is unavailable: {self.runtime.error}", severity="error")
                return
            self._pending = (question, step)
            if self.runtime.state is TutorState.STOPPED:
                self.notify("Restarting the tutor's engine; your question will be answered when it is back.")
            else:
                self.notify("The model is still loading; your question will be answered when it is ready.")
            self.app.start_tutor()  # type: ignore[attr-defined]
            return
        entry = ChatEntry(question, note, step)
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(entry)
        # Anchored, the log follows the reply as it grows with no scroll request per batch of
        # tokens (each one laid the whole screen out again, on the cores the decode needs), and
        # the learner can scroll up to read while it streams without being pulled back down.
        log.anchor()
        self.reply_id = uuid.uuid4().hex
        answer(self, entry, question, self.reply_id, self.runtime.precision)  # a worker: chat_reply.py

    def on_reply_prepared(self, message: ReplyPrepared) -> None:
        message.entry.show_prepared(message.prepared, message.precision)
        self.call_after_refresh(self._keep_question_in_view, message.entry)

    def on_reply_waiting(self, message: ReplyWaiting) -> None:
        message.entry.waiting(message.job)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        await message.entry.finish(message.answer)
        self.call_after_refresh(self._keep_question_in_view, message.entry)
        heap.settle()  # the finished reply's widgets stay for the rest of the conversation

    def on_reply_failed(self, message: ReplyFailed) -> None:
        message.entry.failed(message.why)

    def on_reply_cut(self, message: ReplyCut) -> None:
        message.entry.mark_cut(message.text, message.why)

    def on_token_streamed(self, message: TokenStreamed) -> None:
        if message.entry.answer is None:  # a late batch must not overwrite the final text
            message.entry.set_text(message.text)
            self.call_after_refresh(self._keep_question_in_view, message.entry)

    def _keep_question_in_view(self, entry: ChatEntry) -> None:
        """Stop following the reply once it is taller than the log's view, with the question at
        the top: the lesson's quote under it is what the learner reads first, and following the
        end of a tall reply (a short terminal) would scroll it away."""
        log = self.query_one("#chat-log", VerticalScroll)
        if log.is_anchored and entry.outer_size.height > log.scrollable_content_region.height:
            log.anchor(False)
            log.scroll_to_widget(entry, top=True, animate=False, immediate=True)

    def on_doubts_marked(self, message: DoubtsMarked) -> None:
        self.store.save_marks(self.lesson.id, DOUBT_STEP, message.sentences)
        self.notify(f"Saved {plural(len(message.sentences), 'doubted sentence')} with your step 1 notes.")
        self.query_one("#chat-input", Input).focus()

    # --- actions -------------------------------------------------------------------

    def action_cancel(self) -> None:
        """Esc cancels a reply in flight; otherwise it leaves the input so letter keys switch tabs."""
        if self.reply_id is not None:
            self.runtime.cancel(self.reply_id, self.app.cancel_failed)  # type: ignore[attr-defined]
            self.reply_id = None
            self.notify("Reply cancelled.")
        else:
            self.query_one("#chat-log", VerticalScroll).focus()

    def action_ask_again(self) -> None:
        if self.last is None:
            self.notify("Ask a question first.")
            return
        question, step = self.last
        self.ask(question, step, note=f"(asked again at {self.runtime.precision})")

    def action_history(self, delta: int) -> None:
        if not self.history:
            return
        self._history_at = max(0, min(len(self.history), self._history_at + delta))
        box = self.query_one("#chat-input", Input)
        box.value = self.history[self._history_at] if self._history_at < len(self.history) else ""
        box.cursor_position = len(box.value)

    def action_switch(self, precision: str) -> None:
        refused = switch_refused(self.runtime, precision)
        if refused is not None:
            self.notify(refused)
            return
        self.runtime.switching = precision
        self.update_badge()
        switch(self, precision)  # a worker: chat_precision.py
