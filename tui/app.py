"""The Textual app: a study screen per lesson, every action also in the command palette (tui/commands.py)."""

from __future__ import annotations

from contextlib import suppress
from functools import cached_property, partial

from textual.app import App
from textual.css.query import NoMatches
from textual.events import Resize

from tui import heap
from tui.commands import LessonCommands
from tui.launch import Launch, start_lesson
from tui.messages import TutorStatus
from tui.screens.study import StudyScreen
from tui.screens.too_small import MIN_HEIGHT, MIN_WIDTH, TooSmallScreen
from tui.tutor_runtime import TutorRuntime, TutorState
from tutor.library.content import Library
from tutor.library.finder import LessonFinder
from tutor.library.models import ContentFileError
from tutor.progress.store import Store
from tutor.text import plural


class QuantTutorApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "quant-tutor"
    # "Open lesson: …", searched in the library index; the study screen adds its own (StudyCommands),
    # and get_system_commands keeps Textual's app-wide ones (Quit, Keys, Theme…).
    COMMANDS = App.COMMANDS | {LessonCommands}

    def __init__(
        self,
        library: Library,
        store: Store,
        lesson_id: str | None = None,
        model: str | None = None,
        device: str = "cpu",
        tutor: TutorRuntime | None = None,
        start_engine: bool = False,
    ) -> None:
        super().__init__()
        self.library = library
        self.store = store
        self.start_lesson = start_lesson(library, store, lesson_id)
        self.tutor = tutor or TutorRuntime(library, model=model, device=device)
        self.start_engine = start_engine

    @cached_property
    def lesson_finder(self) -> LessonFinder:
        """One search over the library index for the palette and the Library tab, built the first
        time either searches (the index does not change while the app runs)."""
        return LessonFinder(self.library.lessons.values())

    def on_mount(self) -> None:
        self.push_screen(self._first_study())
        if self.store.notice:
            self.notify(self.store.notice, title="Progress store", severity="warning", timeout=20)
        if self.library.errors:
            first = self.library.errors[0]
            self.notify(
                f"{plural(len(self.library.errors), 'problem')} in the lesson files; the other lessons work. "
                f"First: {first}. The Progress tab lists them all.",
                title="Content",
                severity="error",
                timeout=20,
            )
        self._check_size(self.size.width, self.size.height)
        self.set_interval(1.0, self._check_engine)
        if self.start_engine:
            # Loading starts once the lesson is drawn, so the tutor is ready by the time it is opened.
            self.call_after_refresh(self.start_tutor)

    def on_ready(self) -> None:
        heap.settle()  # everything built for the first frame lives as long as the app

    def _check_engine(self) -> None:
        """Notice an engine that died while idle (no I/O: a look at the child's exit status)."""
        if self.tutor.engine_died():
            self.post_message(TutorStatus())

    def _study(self, lesson_id: str) -> StudyScreen:
        """The lesson's screen; raises ContentFileError for a lesson whose body or quiz is broken
        (the index checks only front matter: the rest is parsed when a lesson is opened)."""
        return StudyScreen(self.library.get(lesson_id), self.library, self.store, self.tutor)

    def _first_study(self) -> StudyScreen:
        """The start lesson's screen or, if it is broken, the first lesson after it that opens."""
        ids = list(self.library.lessons)
        start = ids.index(self.start_lesson)
        for lesson_id in ids[start:] + ids[:start]:
            try:
                return self._study(lesson_id)
            except ContentFileError:
                continue
        raise ContentFileError(self.library.errors)

    @property
    def study(self) -> StudyScreen | None:
        return next((s for s in reversed(self.screen_stack) if isinstance(s, StudyScreen)), None)

    async def open_lesson(self, lesson_id: str) -> None:
        study = self.study
        if study is not None:
            study.save_reading()
            if study.lesson.id == lesson_id:
                return
        try:
            screen = self._study(lesson_id)
        except ContentFileError as exc:
            self.notify(f"This lesson cannot be opened: {exc}", title="Content", severity="error", timeout=20)
            return
        await self.switch_screen(screen)

    # --- the tutor's model ----------------------------------------------------------

    def start_tutor(self) -> None:
        """Load the model and index in the background, once; the UI never waits for it."""
        if self.tutor.state in (TutorState.IDLE, TutorState.FAILED, TutorState.STOPPED):
            study = self.study
            lesson_id = study.lesson.id if study is not None else self.start_lesson
            self.run_worker(partial(self._load_tutor, lesson_id), thread=True, group="tutor-load")

    def _load_tutor(self, lesson_id: str) -> None:
        self.tutor.load(self._tutor_changed, lesson_id)
        self.tutor.follow_index(self._tutor_changed)

    def cancel_failed(self, why: str) -> None:
        """From a thread: the engine could not be told to stop (it is gone or refused)."""
        self.call_from_thread(self.notify, f"Could not cancel: {why}", severity="warning")

    def _tutor_changed(self) -> None:
        self.call_from_thread(self.post_message, TutorStatus())

    def on_tutor_status(self, _message: TutorStatus) -> None:
        study = self.study
        if study is None or not study.is_mounted:
            return
        # A background load may finish while the app is closing: then there is nothing to update.
        with suppress(NoMatches):
            study.tutor_changed()

    async def action_quit(self) -> None:
        study = self.study
        if study is not None and study.is_mounted:
            study.save_reading()
        self.exit()

    # --- too small -----------------------------------------------------------------

    def on_resize(self, event: Resize) -> None:
        self._check_size(event.size.width, event.size.height)

    def _check_size(self, width: int, height: int) -> None:
        small = width < MIN_WIDTH or height < MIN_HEIGHT
        showing = isinstance(self.screen, TooSmallScreen)
        if small and not showing:
            self.push_screen(TooSmallScreen())
        elif not small and showing:
            self.pop_screen()


def run_app(launched: Launch) -> int:
    app = QuantTutorApp(
        launched.library, launched.store, launched.lesson_id, tutor=launched.tutor, start_engine=True
    )
    try:
        app.run()
    finally:
        app.tutor.stop()
        launched.store.close()
    return 0
