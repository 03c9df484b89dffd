"""One question in the tutor tab and everything said about it, drawn as it arrives.

The lesson's own words first (quoted, always right), then the model's explanation labelled with
the precision that wrote it, each sentence checked against the lesson (✓ supported, ? not found
in the lesson, ✗ contradicts it), the cited passage, and the measured stats line. After practice
step 1's question the learner marks the sentences they doubt before the check is revealed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Markdown, SelectionList

from tui.widgets.plain import Plain, literal
from tutor.text import clean

if TYPE_CHECKING:
    from tutor.assistant.grounding import TutorAnswer

DOUBT_STEP = 0  # practice step 1: "underline anything that sounds uncertain"


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
            if check.verdict == "contradicts" and check.evidence:
                # What the lesson says instead, so the learner can see the clash for themselves.
                parts.append((f"\n   the lesson says: “{check.evidence}”", "dim"))
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
