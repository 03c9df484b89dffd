"""The practice tab: each step with the learner's notes (saved as typed) and a done box."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, TextArea

from tui.messages import AskTutor, ProgressChanged
from tui.widgets.plain import Plain, literal
from tutor.library.models import Lesson
from tutor.progress.store import Store

INTRO = (
    "Use a small project example from your own work. The useful move is to compare the AI's "
    "draft against your goal, sources, and constraints before you trust it. "
    "Your notes save as you type. Tab: write notes · Esc: stop writing."
)


def done_label(done: bool) -> str:
    """Done is said in words, not only by the box's colour."""
    return "✓ Done" if done else "Not done yet"


class DoneBox(Checkbox):
    """A step's done box, whose keys the footer names (Checkbox hides them)."""

    BINDINGS = [Binding("space,enter", "toggle_button", "Done / not done", show=True)]


class PracticeView(VerticalScroll, can_focus=True):
    BINDINGS = [
        Binding("tab", "focus_next", "Write notes", show=True),
        Binding("escape", "leave_notes", "Stop writing", show=False),
    ]

    def __init__(self, lesson: Lesson, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.store = store

    def compose(self) -> ComposeResult:
        progress = self.store.lesson(self.lesson.id)
        yield Plain(INTRO, classes="practice-intro")
        for index, step in enumerate(self.lesson.meta.practice):
            with Vertical(classes="step", id=f"step-{index}"):
                yield Plain(literal((f"Step {index + 1} · {step.title}", "bold")), classes="step-title")
                yield Plain(step.prompt, classes="step-prompt")
                notes = TextArea(progress.notes.get(index, ""), id=f"note-{index}", classes="step-notes")
                notes.border_title = "Your notes"
                yield notes
                if step.tutor_question:
                    # The question in full as text: a one-line button would cut it mid-sentence.
                    yield Plain(literal(("The tutor can start you off: ", "italic"), step.tutor_question))
                    yield Button("Ask the tutor", id=f"ask-{index}", classes="ask-tutor", compact=True)
                done = index in progress.steps_done
                yield DoneBox(done_label(done), value=done, id=f"done-{index}")
                yield Plain("", id=f"saved-{index}", classes="saved")

    @staticmethod
    def _step_of(widget_id: str | None) -> int:
        return int((widget_id or "").rsplit("-", 1)[1])

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        step = self._step_of(event.text_area.id)
        self.store.save_note(self.lesson.id, step, event.text_area.text)
        self.query_one(f"#saved-{step}", Plain).show("Notes saved.")

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        step = self._step_of(event.checkbox.id)
        self.store.set_step_done(self.lesson.id, step, event.value)
        event.checkbox.label = done_label(event.value)
        self.post_message(ProgressChanged())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        step = self._step_of(event.button.id)
        question = self.lesson.meta.practice[step].tutor_question
        if question:
            self.post_message(AskTutor(question, step))

    def action_leave_notes(self) -> None:
        """Escape leaves a note field for that step's done box: the letter keys switch tabs
        again, and Tab and Enter go on from where the learner was, not from step 1."""
        focused = self.app.focused
        ancestors = focused.ancestors_with_self if focused is not None else []
        step = next((node for node in ancestors if node.has_class("step")), None)
        if step is None:
            self.focus()
            return
        self.query_one(f"#done-{self._step_of(step.id)}", DoneBox).focus()

    def toggle_done(self, step: int) -> None:
        box = self.query_one(f"#done-{step}", Checkbox)
        box.value = not box.value
