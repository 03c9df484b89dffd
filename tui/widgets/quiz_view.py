"""The quiz tab: one question at a time, immediate feedback, score, retake and review.

Right and wrong are always said with ✓/✗ and words, never by colour alone.
"""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content

from tui.messages import AskTutor, JumpToSection, ProgressChanged
from tui.screens.confirm import ConfirmDiscard
from tui.widgets.plain import Plain, literal
from tutor.library.models import LETTERS, Lesson, Question
from tutor.progress.quiz import (
    Feedback,
    QuizError,
    QuizSession,
    WrongAnswer,
    choice_keys,
    choice_text,
    last_wrong_answers,
    not_a_choice,
)
from tutor.progress.store import Store
from tutor.text import plural, when

INTRO, ASKING, ANSWERED, RESULTS, REVIEW = "intro", "asking", "answered", "results", "review"


def _choice_lines(question: Question, feedback: Feedback | None) -> list[str | tuple[str, str]]:
    parts: list[str | tuple[str, str]] = []
    for index, choice in enumerate(question.choices):
        letter = LETTERS[index]
        if feedback is None:
            parts.append(f"\n  {index + 1}  {letter}) {choice.text}")
            continue
        is_answer = letter == question.answer
        mark = "✓" if is_answer else ("✗" if letter == feedback.chosen else " ")
        note = ""
        if letter == feedback.chosen:
            note = "  ← your answer, correct" if is_answer else "  ← your answer"
        elif is_answer:
            note = "  ← the correct answer"
        parts.append((f"\n{mark} {index + 1}  {letter}) {choice.text}{note}", "bold" if is_answer else ""))
    return parts


class QuizView(VerticalScroll, can_focus=True):
    """The question and its feedback scroll; the line of what to press next is pinned below them,
    so at 80×24 a long explanation never pushes the next action off screen."""

    BINDINGS = [
        *[Binding(k, f"answer('{k}')", "Answer", show=False) for k in "1234abcd"],
        Binding("enter", "primary", "Next"),
        Binding("n", "new_attempt", "New attempt"),
        Binding("w", "review", "Wrong answers"),
        Binding("j", "jump", "Read section"),
        Binding("e", "explain", "Explain this"),
    ]

    def __init__(self, lesson: Lesson, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.lesson = lesson
        self.store = store
        self.session: QuizSession | None = None
        self.state = INTRO
        self.feedback: Feedback | None = None
        self.wrong: list[WrongAnswer] = []  # of the last finished attempt, read from the store
        self._explained = 0

    def compose(self) -> ComposeResult:
        yield Plain(id="quiz-status", classes="quiz-status")
        yield Plain(id="quiz-body")
        yield Plain(id="quiz-keys", classes="quiz-keys")

    def on_mount(self) -> None:
        self.wrong = last_wrong_answers(self.lesson, self.store)
        self.render_state()

    # --- actions -------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = {
            "answer": self.state == ASKING,
            "primary": True,
            "new_attempt": self.state in (INTRO, RESULTS, REVIEW),
            "review": self.state in (INTRO, RESULTS) and bool(self.wrong),
            "jump": self.state in (ANSWERED, ASKING),
            "explain": self.state == ANSWERED or (self.state == REVIEW and bool(self.wrong)),
        }
        return allowed.get(action, True)

    def on_key(self, event: events.Key) -> None:
        """A key that would do nothing here says why instead of being silently ignored."""
        active = self.screen.active_bindings.get(event.key)
        if (active is not None and active.enabled) or not event.is_printable:
            return  # it does something (switching tabs included), or it is not ours to explain
        if self.state == ASKING and event.character:
            event.stop()
            self.action_answer(event.character)  # says which keys this question takes
        elif event.key == "w":
            event.stop()
            self.action_review()
        elif self.state == ANSWERED and event.key in "1234abcd":
            event.stop()
            self.notify("Already answered: Enter for the next question.")

    def action_answer(self, key: str) -> None:
        if self.session is None or self.session.finished:
            return
        try:
            self.feedback = self.session.answer(key)
        except QuizError:
            self.notify(not_a_choice(self.session.current, "press"), severity="warning")
            return
        self.state = ANSWERED
        self.render_state()

    def action_primary(self) -> None:
        if self.state == INTRO:
            self.start(resume=True)
        elif self.state == ASKING and self.session is not None:
            self.notify(f"Answer first: press {choice_keys(self.session.current)}.", severity="warning")
        elif self.state == ANSWERED:
            self.state = RESULTS if self.session is not None and self.session.finished else ASKING
            if self.state == RESULTS:
                self._finished()
            self.render_state()
        elif self.state == REVIEW and self.wrong:
            self.session = QuizSession.review(self.lesson, self.store, [w.question.id for w in self.wrong])
            self.state = ASKING
            self.render_state()
        elif self.state == RESULTS:
            self.action_new_attempt()

    def action_new_attempt(self) -> None:
        """Start from question 1; an unfinished attempt with answers is set aside only if the
        learner says so."""
        pending = self.store.open_attempt(self.lesson.id)
        if pending is None or not pending.answers:
            self.start(resume=False)
            return
        question = (
            f"Start a new attempt? Your unfinished quiz, started {when(pending.started_at)}, has "
            f"{len(pending.answers)} of {len(pending.question_ids)} answered. Starting over sets it aside "
            "(its answers stay in your history, but it will no longer be offered to resume)."
        )

        def decided(discard: bool | None) -> None:
            if discard:
                self.start(resume=False)
            else:
                self.notify("Kept your unfinished quiz: Enter continues where you left off.")

        self.app.push_screen(ConfirmDiscard(question, "Keep it", "Discard and start over"), decided)

    def action_review(self) -> None:
        if self.state in (ASKING, ANSWERED):
            self.notify("Finish this attempt first (every answer is saved); then w reviews what you missed.")
        elif not self.wrong:
            done = self.store.last_finished_attempt(self.lesson.id) is not None
            self.notify(
                "Your last finished attempt had no wrong answers."
                if done
                else "Nothing to review yet: finish the quiz once, then w shows what you missed."
            )
        else:
            self.state = REVIEW
            self.render_state()

    def action_jump(self) -> None:
        if self.session is not None and self.feedback is not None and self.state == ANSWERED:
            self.post_message(JumpToSection(self.feedback.question.source))
        elif self.session is not None and not self.session.finished and self.state == ASKING:
            self.post_message(JumpToSection(self.session.current.source))
        else:
            self.notify("No question is showing: start the quiz (Enter), then j reads its section.")

    def action_explain(self) -> None:
        """Ask the tutor about this question (in review, each wrong one in turn)."""
        if self.state == ANSWERED and self.feedback is not None:
            question = self.feedback.question
        elif self.state == REVIEW and self.wrong:
            question = self.wrong[self._explained % len(self.wrong)].question
            self._explained += 1
        else:
            return
        right = question.choices[question.correct_index].text
        self.post_message(AskTutor(f"{question.stem} Why is the answer “{right}”?"))

    # --- state ---------------------------------------------------------------------

    def start(self, resume: bool) -> None:
        pending = self.store.open_attempt(self.lesson.id)
        if pending is not None and not resume:
            self.store.abandon_attempt(pending.attempt_id)
            pending = None
        self.session = QuizSession(self.lesson, self.store, resume=pending)
        self.feedback = None
        self.state = RESULTS if self.session.finished else ASKING
        self.render_state()

    def _finished(self) -> None:
        self.wrong = last_wrong_answers(self.lesson, self.store)
        self.post_message(ProgressChanged())

    def render_state(self) -> None:
        status = self.query_one("#quiz-status", Plain)
        body = self.query_one("#quiz-body", Plain)
        keys = self.query_one("#quiz-keys", Plain)
        progress = self.store.lesson(self.lesson.id)
        total = len(self.lesson.questions)
        best = "no score yet" if progress.best_score is None else f"best {progress.best_score}/{total}"
        if self.state == INTRO:
            self._render_intro(status, body, keys, f"Quiz · {total} questions · {best}")
        elif self.state in (ASKING, ANSWERED):
            self._render_question(status, body, keys)
        elif self.state == RESULTS:
            self._render_results(status, body, keys, best)
        else:
            self._render_review(status, body, keys)
        self.refresh_bindings()
        self.scroll_home(animate=False)

    def _render_intro(self, status: Plain, body: Plain, keys: Plain, heading: str) -> None:
        attempts = self.store.lesson(self.lesson.id).attempts
        status.show(f"{heading} · {plural(attempts, 'attempt')}")
        review = "    w: review my wrong answers" if self.wrong else ""
        pending = self.store.open_attempt(self.lesson.id)
        if pending is not None:
            body.show(
                f"You have an unfinished quiz started {when(pending.started_at)} "
                f"({len(pending.answers)} of {len(pending.question_ids)} answered)."
            )
            keys.show(f"Enter: continue where you left off    n: start over{review}")
        else:
            body.show(
                "Check what stuck: one question at a time, with feedback after each answer. "
                "Your score saves to your progress."
            )
            keys.show(f"Enter: start{review}")

    def _render_question(self, status: Plain, body: Plain, keys: Plain) -> None:
        assert self.session is not None
        session = self.session
        kind = "Review" if session.kind == "review" else "Question"
        if self.state == ASKING:
            question = session.current
            status.show(f"{kind} {session.index + 1} of {session.total} · {session.score} right so far")
            body.show(literal((question.stem, "bold"), "\n", *_choice_lines(question, None)))
            keys.show(f"Press {choice_keys(question)} to answer    j: read its section")
            return
        feedback = self.feedback
        assert feedback is not None
        question = feedback.question
        verdict = ("✓ Correct. ", "bold") if feedback.correct else ("✗ Not quite. ", "bold")
        status.show(f"{kind} {feedback.number} of {session.total} · {session.score} right so far")
        answer_line = "" if feedback.correct else f"\nThe answer is {choice_text(question, question.answer)}"
        next_hint = "see your score" if session.finished else "next question"
        body.show(
            literal(
                (question.stem, "bold"),
                "\n",
                *_choice_lines(question, feedback),
                "\n\n",
                verdict,
                feedback.chosen_feedback,
                answer_line,
                "\n\n",
                ("Why: ", "bold"),
                question.explanation,
                f"\n\nTaught in “{question.source}”.",
            )
        )
        keys.show(f"Enter: {next_hint}    j: read the section    e: ask the tutor")

    def _render_results(self, status: Plain, body: Plain, keys: Plain, best: str) -> None:
        assert self.session is not None
        session = self.session
        label = "Review score" if session.kind == "review" else "Score"
        status.show(f"{label}: {session.score}/{session.total} · {best}")  # said once, here
        lines: list[str | tuple[str, str]] = []
        for number, question in enumerate(session.questions, 1):
            ok = session.results.get(question.id)
            lines.append(f"{'✓ right' if ok else '✗ wrong'}  {number}. {question.stem}\n")
        body.show(literal(*lines).rstrip())
        wrong = "    w: review my wrong answers" if self.wrong else "    All correct!"
        keys.show(f"n or Enter: take the quiz again{wrong}")

    def _render_review(self, status: Plain, body: Plain, keys: Plain) -> None:
        status.show(f"Reviewing {plural(len(self.wrong), 'wrong answer')} from your last finished attempt")
        parts: list[str | tuple[str, str]] = []
        for item in self.wrong:
            question = item.question
            parts += [
                (question.stem, "bold"),
                f"\n✗ You answered {choice_text(question, item.chosen)}"
                f"\n✓ The answer is {choice_text(question, question.answer)}\n",
                question.explanation,
                f"\nTaught in “{question.source}”.\n\n",
            ]
        body.show(literal(*parts).rstrip())
        keys.show("Enter: try just these again    n: the whole quiz again    e: ask the tutor")

    @property
    def body_text(self) -> str:
        """What the quiz body says now (for tests and screen readers)."""
        visual = self.query_one("#quiz-body", Plain).visual
        return visual.plain if isinstance(visual, Content) else str(visual)
