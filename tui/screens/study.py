"""The study screen: one lesson, with tabs for reading, practice, quiz, the library, progress, the
tutor and the Lab (their table: study_tabs.py; their palette commands: tui/commands.py)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, TabbedContent, TabPane

from tui.commands import StudyCommands
from tui.messages import AskTutor, JumpToSection, OpenLesson, ProgressChanged, ShowTab
from tui.screens.study_tabs import TAB_BY_ID, TABS, tab_label
from tui.tutor_runtime import TutorRuntime, TutorState
from tui.widgets.chat_view import ChatView
from tui.widgets.lab_view import LabView
from tui.widgets.lesson_view import LessonView
from tui.widgets.library_view import LibraryView
from tui.widgets.plain import Plain, literal
from tui.widgets.progress_view import ProgressView
from tutor.library.content import Library
from tutor.library.models import Lesson
from tutor.progress.store import Store


class StudyScreen(Screen[None]):
    COMMANDS = {StudyCommands}  # the palette's commands for this screen: each tab, the quiz, the tutor…
    BINDINGS = [
        *[Binding(tab.key, f"show_tab('{tab.id}')", tab.title, show=False) for tab in TABS],
        Binding("k", "toggle_terms", "Key terms", show=False),
    ]

    def __init__(self, lesson: Lesson, library: Library, store: Store, runtime: TutorRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.lesson = lesson
        self._progress_text = ""
        self.library = library
        self.store = store
        self._pending_jump: str | None = None

    def compose(self) -> ComposeResult:
        # The title gives way (…) to the progress figures, which are always shown whole.
        with Horizontal(id="status-bar"):
            yield Plain(literal(self.lesson.title), id="status-title")
            yield Plain(id="status-progress")
        with TabbedContent(initial="lesson", id="tabs"):
            for tab in TABS:
                with TabPane(tab_label(tab), id=tab.id):
                    yield tab.view(self)
        yield Footer()

    def on_mount(self) -> None:
        self.store.touch_lesson(self.lesson.id)
        self.update_status()
        self.query_one("#lesson-scroll").focus()

    def update_status(self) -> None:
        """Re-read the learner's progress (after a save) and redraw the header."""
        p = self.store.lesson(self.lesson.id)
        total = len(self.lesson.questions)
        best = "quiz not taken" if p.best_score is None else f"best {p.best_score}/{total}"
        steps = f"{len(p.steps_done)}/{len(self.lesson.meta.practice)} steps"
        self._progress_text = f"read {round(p.read_fraction * 100)}% · {steps} · {best}"
        self._draw_status()

    def _draw_status(self) -> None:
        # The tutor's badge changes often while it loads; it never costs a database read.
        tutor = f" · {self.runtime.badge()}" if self.runtime.state is not TutorState.IDLE else ""
        self.query_one("#status-progress", Plain).show(f" · {self._progress_text}{tutor}")

    @property
    def status_text(self) -> str:
        """The header as written (before the title is cut to fit), for tests and screen readers."""
        return self.lesson.title + str(self.query_one("#status-progress", Plain).visual)

    # --- navigation ----------------------------------------------------------------

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self._focus_tab(tab)

    def _focus_tab(self, tab: str) -> None:
        self.query_one(TAB_BY_ID[tab].focus).focus()
        # Both list the whole library: they are filled when shown, never at start-up.
        if tab == "progress":
            self.query_one(ProgressView).refresh_rows()
        if tab == "library":
            self.query_one(LibraryView).refresh_list()
        if tab in ("tutor", "lab"):
            self.app.start_tutor()  # type: ignore[attr-defined]

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id != "lab":
            self.query_one(LabView).stop_jobs()  # leaving the Lab cancels its measurement and compare
        if event.pane.id:
            self._focus_tab(event.pane.id)
        if event.pane.id == "lesson" and self._pending_jump is not None:
            self.call_after_refresh(self._jump, self._pending_jump)
            self._pending_jump = None

    def action_toggle_terms(self) -> None:
        self.query_one(LessonView).toggle_terms()

    def on_jump_to_section(self, message: JumpToSection) -> None:
        if self.query_one(TabbedContent).active == "lesson":
            self._jump(message.heading)
            return
        # A hidden tab has no size: scroll once the lesson tab has been shown and laid out.
        self._pending_jump = message.heading
        self.action_show_tab("lesson")

    def _jump(self, heading: str) -> None:
        if not self.query_one(LessonView).jump_to(heading):
            self.notify(f"The lesson has no section “{heading}”.", severity="warning")

    def on_progress_changed(self, _message: ProgressChanged) -> None:
        self.update_status()

    def on_ask_tutor(self, message: AskTutor) -> None:
        self.action_show_tab("tutor")
        self.query_one(ChatView).prefill(message.question, message.step)

    def tutor_changed(self) -> None:
        self._draw_status()
        self.query_one(ChatView).update_badge()
        self.query_one(LabView).tutor_changed()

    def on_show_tab(self, message: ShowTab) -> None:
        if message.tab in TAB_BY_ID:
            self.action_show_tab(message.tab)

    def on_open_lesson(self, message: OpenLesson) -> None:
        self.app.call_later(self.app.open_lesson, message.lesson_id)  # type: ignore[attr-defined]

    def save_reading(self) -> None:
        """Write the scroll position now (before leaving the lesson or quitting)."""
        self.query_one(LessonView).save_position()
