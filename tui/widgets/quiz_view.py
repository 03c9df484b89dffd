"""The quiz tab: one question at a time, immediate feedback, score, retake and review.

Right and wrong are always said with ✓/✗ and words, never by colour alone.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content

from tui.messages import AskTutor, JumpToSection, ProgressChanged
from tui.widgets.plain import Plain, literal
from tutor.content import LETTERS, Lesson, Question
from tutor.quiz import Feedback, QuizError, QuizSession
from tutor.store import Store
from tutor.text import when

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
        self.last_wrong: list[str] = []
        self._explained = 0

    def compose(self):  # type: ignore[no-untyped-def]
        yield Plain(id="quiz-status", classes="quiz-status")
        yield Plain(id="quiz-body")

    def on_mount(self) -> None:
        self.render_state()

    # --- actions -------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = {
            "answer": self.state == ASKING,
            "primary": True,
            "new_attempt": self.state in (INTRO, RESULTS, REVIEW),
            "review": self.state == RESULTS and bool(self.last_wrong),
            "jump": self.state in (ANSWERED, ASKING),
            "explain": self.state == ANSWERED or (self.state == REVIEW and bool(self.last_wrong)),
        }
        return allowed.get(action, True)

    def action_answer(self, key: str) -> None:
        if self.session is None or self.session.finished:
            return
        try:
            self.feedback = self.session.answer(key)
        except QuizError as exc:
            self.notify(str(exc), severity="warning")
            return
        self.state = ANSWERED
        self.render_state()

    def action_primary(self) -> None:
        if self.state == INTRO:
            self.start(resume=True)
        elif self.state == ANSWERED:
            self.state = RESULTS if self.session is not None and self.session.finished else ASKING
            if self.state == RESULTS:
                self._finished()
            self.render_state()
        elif self.state == REVIEW and self.last_wrong:
            self.session = QuizSession.review(self.lesson, self.store, self.last_wrong)
            self.state = ASKING
            self.render_state()
        elif self.state == RESULTS:
            self.start(resume=False)

    def action_new_attempt(self) -> None:
        self.start(resume=False)

    def action_review(self) -> None:
        self.state = REVIEW
        self.render_state()

    def action_jump(self) -> None:
        if self.session is not None and self.feedback is not None and self.state == ANSWERED:
            self.post_message(JumpToSection(self.feedback.question.source))
        elif self.session is not None and not self.session.finished:
            self.post_message(JumpToSection(self.session.current.source))

    def action_explain(self) -> None:
        """Ask the tutor about this question (in review, each wrong one in turn)."""
        if self.state == ANSWERED and self.feedback is not None:
            question = self.feedback.question
        elif self.state == REVIEW and self.last_wrong:
            by_id = {q.id: q for q in self.lesson.questions}
            question = by_id[self.last_wrong[self._explained % len(self.last_wrong)]]
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
        assert self.session is not None
        self.last_wrong = self.session.wrong_ids()
        self.post_message(ProgressChanged())

    def render_state(self) -> None:
        status = self.query_one("#quiz-status", Plain)
        body = self.query_one("#quiz-body", Plain)
        progress = self.store.lesson(self.lesson.id)
        total = len(self.lesson.questions)
        best = "no score yet" if progress.best_score is None else f"best {progress.best_score}/{total}"
        if self.state == INTRO:
            pending = self.store.open_attempt(self.lesson.id)
            status.show(f"Quiz · {total} questions · {best} · {progress.attempts} attempt(s)")
            if pending is not None:
                body.show(
                    f"You have an unfinished quiz started {when(pending.started_at)} "
                    f"({len(pending.answers)} of {len(pending.question_ids)} answered).\n\n"
                    "Enter: continue where you left off    n: start over"
                )
            else:
                body.show(
                    "Check what stuck: one question at a time, with feedback after each answer. "
                    "Your score saves to your progress.\n\nEnter: start"
                )
        elif self.state in (ASKING, ANSWERED):
            self._render_question(status, body)
        elif self.state == RESULTS:
            self._render_results(status, body, best)
        else:
            self._render_review(status, body)
        self.refresh_bindings()
        self.scroll_home(animate=False)

    def _render_question(self, status: Plain, body: Plain) -> None:
        assert self.session is not None
        session = self.session
        kind = "Review" if session.kind == "review" else "Question"
        if self.state == ASKING:
            question = session.current
            status.show(f"{kind} {session.index + 1} of {session.total} · {session.score} right so far")
            body.show(
                literal(
                    (question.stem, "bold"),
                    "\n",
                    *_choice_lines(question, None),
                    "\n\nPress 1–4 or a–d to answer.",
                )
            )
            return
        feedback = self.feedback
        assert feedback is not None
        question = feedback.question
        verdict = ("✓ Correct. ", "bold") if feedback.correct else ("✗ Not quite. ", "bold")
        status.show(f"{kind} {feedback.number} of {session.total} · {session.score} right so far")
        right = question.choices[question.correct_index]
        answer_line = "" if feedback.correct else f"\nThe answer is {question.answer}) {right.text}"
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
                f"\n\nTaught in “{question.source}”. j: read it    e: ask the tutor    Enter: {next_hint}",
            )
        )

    def _render_results(self, status: Plain, body: Plain, best: str) -> None:
        assert self.session is not None
        session = self.session
        label = "Review score" if session.kind == "review" else "Score"
        status.show(f"{label}: {session.score}/{session.total} · {best}")
        lines: list[str | tuple[str, str]] = [(f"{label}: {session.score}/{session.total}", "bold"), "\n"]
        for number, question in enumerate(session.questions, 1):
            ok = session.results.get(question.id)
            lines.append(f"\n{'✓ right' if ok else '✗ wrong'}  {number}. {question.stem}")
        wrong = "    w: review my wrong answers" if self.last_wrong else "    All correct!"
        lines.append(f"\n\nn or Enter: take the quiz again{wrong}")
        body.show(literal(*lines))

    def _render_review(self, status: Plain, body: Plain) -> None:
        by_id = {q.id: q for q in self.lesson.questions}
        answers = {}
        if self.session is not None:
            answers = {r.question_id: r.choice for r in self.store.attempt_answers(self.session.attempt_id)}
        status.show(f"Reviewing {len(self.last_wrong)} wrong answer(s)")
        parts: list[str | tuple[str, str]] = []
        for qid in self.last_wrong:
            question = by_id[qid]
            chosen = answers.get(qid)
            right = question.choices[question.correct_index].text
            yours = f"{chosen}) {question.choices[LETTERS.index(chosen)].text}" if chosen else "—"
            parts += [
                (question.stem, "bold"),
                f"\n✗ You answered {yours}\n✓ The answer is {question.answer}) {right}\n",
                question.explanation,
                f"\nTaught in “{question.source}”.\n\n",
            ]
        parts.append(
            "Enter: try just these again    n: take the whole quiz again    e: ask the tutor to explain"
        )
        body.show(literal(*parts))

    @property
    def body_text(self) -> str:
        """What the quiz body says now (for tests and screen readers)."""
        visual = self.query_one("#quiz-body", Plain).visual
        return visual.plain if isinstance(visual, Content) else str(visual)
