"""The command palette's providers: the study screen's commands, and "Open lesson" over the library.

``StudyCommands`` is the study screen's ``COMMANDS``: go to each tab, the key terms, the quiz, the
tutor's precisions and the practice steps. The palette lists them by title when it opens and
fuzzy-matches their titles as the learner types, as Textual's own system commands do (those
app-wide ones, Quit, Keys, Theme…, stay with the app's ``get_system_commands``).

``LessonCommands`` is the app's: a library can hold thousands of lessons; listing each as a
command made the palette fuzzy-match and draw every one of them on each key press. It discovers
only the current lesson's related ones and answers a search with the first few matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from textual.command import DiscoveryHit, Hit, Hits, Provider, SimpleCommand
from textual.widget import Widget

from tui.screens.study_tabs import TABS
from tui.tutor_runtime import TutorState
from tui.widgets.chat_precision import PRECISION_KEYS
from tui.widgets.chat_view import ChatView
from tui.widgets.practice_view import PracticeView
from tui.widgets.quiz_view import QuizView
from tutor.library.models import LessonEntry

if TYPE_CHECKING:
    from tui.app import QuantTutorApp
    from tui.screens.study import StudyScreen

MAX_HITS = 20
PREFIX = "Open lesson: "
_PREFIX_WORDS = {"open", "lesson", "lesson:"}  # the learner may type the command's own name first

View = TypeVar("View", bound=Widget)


def _in_tab(study: StudyScreen, tab: str, view: type[View], action: Callable[[View], object]) -> None:
    """A command of one tab: show the tab, then run ``action`` on its view."""
    study.action_show_tab(tab)
    action(study.query_one(view))


class StudyCommands(Provider):
    """The study screen's commands, built each time the palette asks (some depend on the tutor's state)."""

    @property
    def _study(self) -> StudyScreen:
        return self.screen  # type: ignore[return-value]  # the screen whose COMMANDS hold this provider

    def commands(self) -> Iterator[SimpleCommand]:
        study = self._study
        for tab in TABS:
            yield SimpleCommand(
                f"Go to {tab.title}",
                partial(study.action_show_tab, tab.id),
                f"Show the {tab.title.lower()} tab",
            )
        yield SimpleCommand("Toggle key terms", study.action_toggle_terms, "Show or hide the key-terms panel")
        quiz = partial(_in_tab, study, "quiz", QuizView)
        yield SimpleCommand(
            "Quiz: new attempt", partial(quiz, QuizView.action_new_attempt), "Start the quiz from question 1"
        )
        yield SimpleCommand(
            "Quiz: continue", partial(quiz, QuizView.action_primary), "Start or resume the quiz"
        )
        yield SimpleCommand(
            "Quiz: review my wrong answers",
            partial(quiz, QuizView.action_review),
            "Your last finished attempt's misses, with explanations (w)",
        )
        yield SimpleCommand(
            "Quiz: read the question's section",
            partial(quiz, QuizView.action_jump),
            "Jump to where the lesson teaches it",
        )
        chat = partial(_in_tab, study, "tutor", ChatView)
        for key, precision in PRECISION_KEYS.items():
            yield SimpleCommand(
                f"Tutor: switch to {precision}",
                partial(chat, partial(ChatView.action_switch, precision=precision)),
                f"Requantize the tutor's model live ({key.upper()})",
            )
        yield SimpleCommand(
            "Tutor: ask again at this precision",
            partial(chat, ChatView.action_ask_again),
            "Re-run the last question (Ctrl+R)",
        )
        if study.runtime.state is TutorState.IDLE:
            app: QuantTutorApp = self.app  # type: ignore[assignment]
            yield SimpleCommand(
                "Tutor: load the model now", app.start_tutor, "Start loading in the background"
            )
        practice = study.query_one(PracticeView)
        for index, step in enumerate(study.lesson.meta.practice):
            yield SimpleCommand(
                f"Practice: mark step {index + 1} done / not done",
                partial(practice.toggle_done, index),
                step.title,
            )

    async def discover(self) -> Hits:
        # By title, as Textual's system commands are listed (those come as a block of their own).
        for name, callback, help_text in sorted(self.commands(), key=lambda command: command.name):
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self.commands():
            if (match := matcher.match(name)) > 0:
                yield Hit(match, matcher.highlight(name), callback, help=help_text)


class LessonCommands(Provider):
    @property
    def _app(self) -> QuantTutorApp:
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        study = self._app.study
        lessons = self._app.library.lessons
        for lesson_id in study.lesson.meta.related if study is not None else ():
            if lesson_id in lessons:
                entry = lessons[lesson_id]
                yield DiscoveryHit(PREFIX + entry.title, self._opener(entry), help=entry.summary)

    async def search(self, query: str) -> Hits:
        words = query.split()
        while words and words[0].casefold() in _PREFIX_WORDS:
            words.pop(0)
        if not words:
            return
        matcher = self.matcher(" ".join(words))
        for rank, entry in enumerate(self._app.lesson_finder.find(" ".join(words))[:MAX_HITS]):
            name = PREFIX + entry.title
            # Every word matched somewhere (title, track or summary); the title's own fuzzy
            # score orders the hits, and the library's order breaks ties.
            score = max(matcher.match(name), 0.5) - rank / 1000
            yield Hit(score, matcher.highlight(name), self._opener(entry), text=name, help=entry.summary)

    def _opener(self, entry: LessonEntry) -> partial[object]:
        return partial(self._app.open_lesson, entry.id)  # the palette awaits it once it has closed
