"""The tutor tab: questions answered from the lesson, the model's explanation streamed beside it.

Every answer leads with the lesson's own words (quoted, always right), then the model's
explanation labelled with the precision that wrote it, each sentence marked ✓ supported,
? not found in the lesson, or ✗ contradicts it, the cited passage, and the measured stats.
The learner switches precision live (F5–F10) without losing the conversation.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Markdown, SelectionList

from tui.messages import TutorStatus
from tui.tutor_runtime import TutorState
from tui.widgets.plain import Plain, literal
from tutor.engine.client import EngineGone, EngineRefused
from tutor.engine.precisions import MEASURED
from tutor.library.models import Lesson
from tutor.progress.store import Store
from tutor.text import clean, plural

if TYPE_CHECKING:
    from tui.tutor_runtime import TutorRuntime
    from tutor.assistant.grounding import TutorAnswer

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
DOUBT_STEP = 0  # practice step 1: "underline anything that sounds uncertain"
# Streamed text is drawn at most this often: a redraw per token would take the engine's cores.
FLUSH_S = 0.08


class ReplyEvent(Message):
    """What the engine said about one entry's reply, posted by the reply's worker and drawn by
    the chat on the UI thread, in the order it was said."""

    def __init__(self, entry: ChatEntry) -> None:
        super().__init__()
        self.entry = entry


class TokenStreamed(ReplyEvent):
    def __init__(self, entry: ChatEntry, text: str) -> None:
        super().__init__(entry)
        self.text = text


class ReplyWaiting(ReplyEvent):
    def __init__(self, entry: ChatEntry, job: str) -> None:
        super().__init__(entry)
        self.job = job


class ReplyPrepared(ReplyEvent):
    def __init__(self, entry: ChatEntry, prepared: dict[str, Any], precision: str) -> None:
        super().__init__(entry)
        self.prepared = prepared
        self.precision = precision


class ReplyFinished(ReplyEvent):
    def __init__(self, entry: ChatEntry, answer: TutorAnswer) -> None:
        super().__init__(entry)
        self.answer = answer


class ReplyFailed(ReplyEvent):
    def __init__(self, entry: ChatEntry, why: str) -> None:
        super().__init__(entry)
        self.why = why


class ReplyCut(ReplyEvent):
    """The engine died mid-reply: ``text`` arrived before it did."""

    def __init__(self, entry: ChatEntry, text: str, why: str) -> None:
        super().__init__(entry)
        self.text = text
        self.why = why


class ChatEntry(Vertical):
    """One question and everything the tutor says about it."""

    BINDINGS = [Binding("v", "reveal", "Reveal the check")]

    def __init__(self, question: str, note: str, step: int | None) -> None:
        super().__init__(classes="chat-entry")
        self.question = question
        self.note = note
        self.step = step
        self.answer: TutorAnswer | None = None

    def compose(self) -> ComposeResult:
        yield Plain(literal(("You: ", "bold"), self.question, (f"  {self.note}" if self.note else "", "dim")))
        yield Plain("Searching the lesson…", classes="chat-quote")
        explanation = Plain(classes="chat-model")
        explanation.display = False
        yield explanation
        yield Plain(classes="chat-checks")
        yield Plain(classes="chat-passage")
        yield Plain(classes="chat-stats")

    def waiting(self, job: str) -> None:
        self.query_one(".chat-quote", Plain).show(
            f"Waiting for the engine (busy with {job or 'another job'})…"
        )

    def show_prepared(self, prepared: dict[str, Any], precision: str) -> None:
        """The lesson's side, before the model runs: the quote and the cited passage, or the decline."""
        if prepared["question_cut"]:
            self.notify(
                f"Your question was cut to its first {len(prepared['question'])} characters.",
                severity="warning",
            )
        quote = self.query_one(".chat-quote", Plain)
        if not prepared["grounded"]:
            quote.show(literal(("Tutor: ", "bold"), prepared["decline"] or ""))
            return
        if prepared["quote"] is not None:
            quote.show(
                literal(
                    (f"From the lesson · {prepared['quote']['section']}\n", "bold"),
                    f"“{prepared['quote']['text']}”",
                )
            )
        citations = prepared["citations"]
        if citations:
            first = citations[0]
            others = ", ".join(c["section"] for c in citations[1:])
            more = f"\nAlso cited: {others}" if others else ""
            self.query_one(".chat-passage", Plain).show(
                literal((f"Cited passage · {first['title']} › {first['section']}", "bold"), more)
            )
            # Lesson text, drawn as the Lesson tab draws it (tables as tables); no link opens.
            passage = Markdown(clean(first["text"]), open_links=False, classes="chat-passage-text")
            self.mount(passage, after=self.query_one(".chat-passage"))
        explanation = self.query_one(".chat-model", Plain)
        explanation.border_title = f"The model's explanation · {precision} · check it against the lesson"
        explanation.display = True

    def set_text(self, text: str) -> None:
        """The model's text so far, shown literally (never as Markdown or markup)."""
        self.query_one(".chat-model", Plain).show(text)

    def mark_cut(self, text: str, reason: str) -> None:
        """The engine died mid-reply: keep what arrived and say that it was cut, and why."""
        self.set_text(text or "(nothing arrived)")
        self.query_one(".chat-stats", Plain).show(
            literal(("✗ reply cut: ", "bold"), f"{reason}. Ask again: the engine restarts.")
        )

    def failed(self, message: str) -> None:
        self.query_one(".chat-stats", Plain).show(literal(("✗ no answer: ", "bold"), message))

    async def finish(self, answer: TutorAnswer) -> None:
        self.answer = answer
        if answer.grounded:
            # The stream showed tokens as they came; show the cleaned, final text.
            self.set_text(answer.generated or "(no text)")
        if answer.grounded:
            self.query_one(".chat-stats", Plain).show(answer.stats.describe(answer.precision))
        if self.step == DOUBT_STEP and answer.sentences:
            hint = Plain(
                "Step 1: mark the sentences that sound uncertain or too broad (Space or Enter), "
                "then press v to reveal the lesson's check.",
                classes="chat-hint",
            )
            doubts = SelectionList[int](
                *[(s.text, i) for i, s in enumerate(answer.sentences)], classes="doubts"
            )
            await self.mount(hint, doubts, before=self.query_one(".chat-passage"))
            doubts.focus()
        else:
            self.reveal_checks()

    def reveal_checks(self, marked: set[int] | None = None) -> None:
        if self.answer is None or not self.answer.sentences:
            return
        parts: list[str | tuple[str, str]] = [("Checked against the lesson:", "bold")]
        for index, check in enumerate(self.answer.sentences):
            mine = ""
            if marked is not None:
                mine = "  (you doubted this)" if index in marked else "  (you trusted this)"
            symbol, words = check.mark.split(" ", 1)
            parts += [
                f"\n{symbol} ",
                (words, "italic"),
                ": ",
                check.text,
                (mine, "dim"),
            ]
        self.query_one(".chat-checks", Plain).show(literal(*parts))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return bool(self.query(SelectionList)) if action == "reveal" else True

    def action_reveal(self) -> None:
        doubts = self.query(SelectionList)
        if not doubts or self.answer is None:
            return
        marked = set(doubts.first().selected)
        self.reveal_checks(marked)
        self.post_message(DoubtsMarked(self, [self.answer.sentences[i].text for i in sorted(marked)]))
        for widget in [*doubts, *self.query(".chat-hint")]:
            widget.remove()


class DoubtsMarked(Message):
    def __init__(self, entry: ChatEntry, sentences: list[str]) -> None:
        super().__init__()
        self.entry = entry
        self.sentences = sentences


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
        self._request: str | None = None  # the reply in flight, by its request id
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
        self.query_one("#chat-badge", Plain).show(text)
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
        log.scroll_end(animate=False)
        self._request = uuid.uuid4().hex
        self._answer(entry, question, self._request, self.runtime.precision)

    @work(thread=True, group="reply")
    def _answer(self, entry: ChatEntry, question: str, request_id: str, precision: str) -> None:
        from tutor.assistant.grounding import TutorAnswer

        client = self.runtime.client
        assert client is not None
        pieces: list[str] = []
        flushed = 0.0
        try:
            for event in client.ask(
                question, lesson_id=self.lesson.id, precision=precision, request_id=request_id
            ):
                if event.name == "token":
                    pieces.append(clean(event.data["text"]))
                    if time.monotonic() - flushed >= FLUSH_S:
                        flushed = time.monotonic()
                        self.post_message(TokenStreamed(entry, "".join(pieces)))
                elif event.name == "prepared":
                    self.post_message(ReplyPrepared(entry, event.data, precision))
                elif event.name == "waiting":
                    self.post_message(ReplyWaiting(entry, event.data["job"]))
                elif event.name == "answer":
                    self.post_message(ReplyFinished(entry, TutorAnswer.from_dict(event.data)))
                elif event.name == "error":
                    self.post_message(ReplyFailed(entry, event.data["message"]))
        except EngineGone as exc:
            self.runtime.connection_lost(str(exc))
            self.post_message(ReplyCut(entry, "".join(pieces), self.runtime.error))
            self.app.post_message(TutorStatus())
        except EngineRefused as exc:
            self.post_message(ReplyFailed(entry, str(exc)))
        finally:
            if self._request == request_id:
                self._request = None

    def on_reply_prepared(self, message: ReplyPrepared) -> None:
        message.entry.show_prepared(message.prepared, message.precision)

    def on_reply_waiting(self, message: ReplyWaiting) -> None:
        message.entry.waiting(message.job)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        await message.entry.finish(message.answer)

    def on_reply_failed(self, message: ReplyFailed) -> None:
        message.entry.failed(message.why)

    def on_reply_cut(self, message: ReplyCut) -> None:
        message.entry.mark_cut(message.text, message.why)

    def on_token_streamed(self, message: TokenStreamed) -> None:
        if message.entry.answer is None:  # a late batch must not overwrite the final text
            message.entry.set_text(message.text)
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def on_doubts_marked(self, message: DoubtsMarked) -> None:
        self.store.save_marks(self.lesson.id, DOUBT_STEP, message.sentences)
        self.notify(f"Saved {plural(len(message.sentences), 'doubted sentence')} with your step 1 notes.")
        self.query_one("#chat-input", Input).focus()

    # --- actions -------------------------------------------------------------------

    def action_cancel(self) -> None:
        """Esc cancels a reply in flight; otherwise it leaves the input so letter keys switch tabs."""
        if self._request is not None:
            self.runtime.cancel(self._request, self.app.cancel_failed)  # type: ignore[attr-defined]
            self._request = None
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
        if not self.runtime.ready:
            self.notify("The model is not loaded yet.")
            return
        if self.runtime.switching:
            self.notify(f"Already switching to {self.runtime.switching}.")
            return
        if self.runtime.precision == precision:
            self.notify(f"Already at {precision}.")
            return
        self.runtime.switching = precision
        self.update_badge()
        self._switch(precision)

    @work(thread=True, group="switch")
    def _switch(self, precision: str) -> None:
        runtime = self.runtime
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
        self.app.call_from_thread(self.notify, message, title="Precision", severity=severity, timeout=8)
        self.app.post_message(TutorStatus())
