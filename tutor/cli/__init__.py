"""The ``quant-tutor`` command line: plain commands for screen readers and scripts.

One click group, :data:`quant_tutor`. With no command it opens the app, through the
``open_app`` that ``tui.entry`` (the console script) hands :func:`run`: nothing in this package
imports textual or ``tui``. The commands that load the model (``ask``, ``cliff``:
``tutor.cli.model``; ``eval``: ``tutor.cli.evaluate``), ``bench`` (``tutor.engine.bench``) and
``serve`` (``tutor.service.server``) are imported only when they run, so ``--version`` and the
plain commands here never import torch, transformers or the engine.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from tutor import __version__
from tutor.cli.lazy import Lazy, LazyGroup
from tutor.library.content import Library, json_schema, load_library, validate_library
from tutor.library.models import LETTERS, QUIZ_LENGTH, ContentFileError, Lesson
from tutor.library.plain import plain_text
from tutor.progress.errors import StoreError
from tutor.progress.records import LessonSummary
from tutor.progress.store import Store
from tutor.text import plural, when

# A path option or argument: not checked here (the command says what is wrong with it).
PATH = click.Path(path_type=Path)


class CliError(click.ClickException):
    """A problem the learner can fix; printed as one line, exit status 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"quant-tutor: {self.format_message()}", file=file or sys.stderr)


@dataclass(frozen=True)
class AppOptions:
    """The options given before the command name. The app opens with them; every command reads
    its lessons from ``content``; and each one given is the default of a command's own option of
    the same name (``quant-tutor --model M ask …`` asks M)."""

    content: Path | None = None
    lesson: str | None = None
    model: str | None = None
    device: str = "cpu"
    engine: str | None = None
    variants: Path | None = None


@dataclass
class Session:
    """One run of the group (its context's ``obj``): what the Textual side handed :func:`run`, and
    the options given before the command name."""

    open_app: Callable[[AppOptions], int] | None = None  # no command: the app
    bench_app: Callable[[], click.Command] | None = None  # `bench --app`: the app's own bench
    options: AppOptions = field(default_factory=AppOptions)


pass_session = click.make_pass_decorator(Session, ensure=True)


class QuantTutorGroup(LazyGroup):
    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        # `bench --app` measures the app, whose bench lives with it (tui.app_bench) and has
        # options of its own: it takes the command's place, when the app handed it in.
        session = ctx.find_object(Session)
        if name == "bench" and "--app" in rest and session is not None and session.bench_app is not None:
            command = session.bench_app()
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader stopped (`quant-tutor lessons | head -1`): it has what it wanted, and
            # nothing is left to flush at exit (Python's "Note on SIGPIPE").
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0


@click.group(
    cls=QuantTutorGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Learn AI model quantization in your terminal. With no command, opens the app.\n\n"
    "An option given before the command is also the default of the command's own option of that name.",
    # Imported only when they run (or for their own --help): each imports the engine.
    lazy_subcommands={
        "ask": Lazy("tutor.cli.model:ask", "ask the tutor; it answers from the lessons with the local model"),
        "cliff": Lazy(
            "tutor.cli.model:cliff", "measure quality against bf16 at every precision: PPL, KL, top-1, QA"
        ),
        "eval": Lazy(
            "tutor.cli.evaluate:eval_command",
            "score retrieval, the quote and the support check on the evaluation sets (no model)",
        ),
        "bench": Lazy(
            "tutor.engine.bench:command", "Measure every precision side by side: memory, switch time, speed."
        ),
        "serve": Lazy(
            "tutor.service.server:command", "Run the tutor's model as an OpenAI-compatible server."
        ),
        "warm": Lazy(
            "tutor.cli.model:warm",
            "convert the model, index the lessons and calibrate gptq4 now, once (make install runs this)",
        ),
    },
)
@click.version_option(__version__, prog_name="quant-tutor", message="%(prog)s %(version)s")
@click.option("--content", type=PATH, help="lesson folder to use instead of the shipped one")
@click.option("--lesson", help="open the app at this lesson id")
@click.option("--model", help="the tutor's model: local HF folder, .gguf file or hub id")
@click.option("--device", default="cpu", help="where the tutor's model runs: cpu (default) or cuda")
@click.option(
    "--engine",
    metavar="URL",
    help="the tutor's replies from this OpenAI-compatible server (vLLM, llama-server, Ollama, "
    "quant-tutor serve; its key in QUANT_TUTOR_REMOTE_KEY), or local (default: the config file's, "
    "else local)",
)
@click.option(
    "--variants",
    type=PATH,
    metavar="TOML",
    help='with --engine: precision = "served model id" lines (default: the ids the server lists)',
)
@click.pass_context
def quant_tutor(
    ctx: click.Context,
    content: Path | None,
    lesson: str | None,
    model: str | None,
    device: str,
    engine: str | None,
    variants: Path | None,
) -> None:
    session = ctx.ensure_object(Session)
    session.options = AppOptions(content, lesson, model, device, engine, variants)
    # Click's defaults for subcommands (ctx.default_map): an option given here is the default of
    # the command's own option of the same name (`quant-tutor --device cuda cliff` runs on cuda).
    given = {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    ctx.default_map = {name: given for name in quant_tutor.list_commands(ctx)}
    if ctx.invoked_subcommand is None:
        if session.open_app is None:  # run without the app (tutor.cli alone): say what there is
            click.echo(ctx.get_help())
            ctx.exit(0)
        ctx.exit(session.open_app(session.options))


def run(
    argv: Sequence[str] | None = None,
    *,
    open_app: Callable[[AppOptions], int] | None = None,
    bench_app: Callable[[], click.Command] | None = None,
) -> int:
    """Run ``quant-tutor`` with ``argv`` (default: the process's own); its exit status.

    ``open_app`` runs when no command is given, ``bench_app`` gives the command that
    ``bench --app`` runs: both come from ``tui.entry``, which this package never imports.
    """
    session = Session(open_app=open_app, bench_app=bench_app)
    try:
        status = quant_tutor.main(
            None if argv is None else list(argv), prog_name="quant-tutor", standalone_mode=False, obj=session
        )
    except click.ClickException as exc:  # usage errors (exit 2, the option named) and CliError
        exc.show()
        return exc.exit_code
    except click.Abort:  # Ctrl+C (click has ended the ^C line)
        click.echo("quant-tutor: interrupted; everything answered so far is saved.", err=True)
        return 130
    return status if isinstance(status, int) else 0


def library(session: Session) -> Library:
    """The lessons (``--content``, else the shipped ones); a broken one is warned about."""
    loaded = load_library(session.options.content)
    for error in loaded.errors:
        print(f"quant-tutor: warning: {error}", file=sys.stderr)
    return loaded


def _lesson(library: Library, lesson_id: str) -> Lesson:
    try:
        return library.get(lesson_id)
    except KeyError as exc:
        raise CliError(exc.args[0]) from None
    except ContentFileError as exc:
        raise CliError(f"lesson {lesson_id!r} cannot be opened:\n{exc}") from None


def _open_store() -> Store:
    try:
        store = Store()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if store.notice:
        print(f"quant-tutor: {store.notice}", file=sys.stderr)
    return store


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


@quant_tutor.command(help="list the lessons")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
@pass_session
def lessons(session: Session, as_json: bool) -> None:
    rows = [{"id": x.id, "title": x.title, "minutes": x.minutes} for x in library(session).lessons.values()]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        sys.stdout.write(f"{row['id']}  ({row['minutes']} min)  {row['title']}\n")


@quant_tutor.command(help="print a lesson as plain text\n\nLESSON: lesson id (see `quant-tutor lessons`)")
@click.argument("lesson_id", metavar="LESSON")
@pass_session
def read(session: Session, lesson_id: str) -> None:
    sys.stdout.write(plain_text(_lesson(library(session), lesson_id)))


@quant_tutor.command(help="take a lesson's quiz\n\nLESSON: lesson id")
@click.argument("lesson_id", metavar="LESSON")
@click.option("--plain", is_flag=True, help="questions on stdout, one answer letter per line on stdin")
@click.option("--restart", is_flag=True, help="start over instead of resuming")
@click.option("--review", is_flag=True, help="show the wrong answers of your last finished attempt and stop")
@pass_session
@click.pass_context
def quiz(
    ctx: click.Context, session: Session, lesson_id: str, plain: bool, restart: bool, review: bool
) -> None:
    if not plain:
        raise CliError(
            "the interactive quiz is in the app (run `quant-tutor`); add --plain for the text quiz"
        )
    lesson = _lesson(library(session), lesson_id)
    store = _open_store()
    try:
        if review:
            _review(lesson, store)
        elif not _plain_quiz(lesson, store, restart):
            ctx.exit(1)  # stopped before the end; the answers so far are saved
    finally:
        store.close()


@quant_tutor.command(help="show progress per lesson")
@click.option("--json", "as_json", is_flag=True, help="print JSON keyed by lesson id")
@pass_session
def progress(session: Session, as_json: bool) -> None:
    loaded = library(session)
    store = _open_store()
    try:
        summaries = store.summaries()
    finally:
        store.close()
    rows: dict[str, dict[str, Any]] = {}
    for entry in loaded.lessons.values():
        p = summaries.get(entry.id, LessonSummary())
        rows[entry.id] = {
            "title": entry.title,
            "read_percent": round(p.read_fraction * 100),
            "steps_done": p.steps_done,
            "steps_total": entry.steps,
            "best_score": p.best_score,
            "last_score": p.last_score,
            "attempts": p.attempts,
            "questions": QUIZ_LENGTH,
        }
    if as_json:
        _print_json(rows)
        return
    for lesson_id, row in rows.items():
        done = (
            "quiz not taken"
            if row["best_score"] is None
            else f"best {row['best_score']}/{row['questions']} over {plural(row['attempts'], 'attempt')}"
        )
        steps = f"{row['steps_done']}/{row['steps_total']}"
        sys.stdout.write(f"{lesson_id}: read {row['read_percent']}%, steps {steps}, {done}\n")


@quant_tutor.command(help="print the JSON Schema of lesson.md front matter and quiz.yaml")
def schema() -> None:
    _print_json(json_schema())


@quant_tutor.command(
    help="check every lesson whole (front matter, body, quiz, related ids); exit 1 on errors\n\n"
    "FOLDER: the lesson folder (default: --content, or the shipped lessons)"
)
@click.argument("folder", required=False, type=PATH)
@pass_session
@click.pass_context
def validate(ctx: click.Context, session: Session, folder: Path | None) -> None:
    checked = validate_library(folder or session.options.content)
    for error in checked.errors:
        print(error, file=sys.stderr)
    if checked.errors:
        print(f"{plural(len(checked.errors), 'problem')} in {checked.root}", file=sys.stderr)
        ctx.exit(1)
    sys.stdout.write(f"{plural(len(checked.lessons), 'lesson')} in {checked.root}: all valid\n")


def _review(lesson: Lesson, store: Store) -> None:
    from tutor.progress.quiz import choice_text, last_wrong_answers

    out = sys.stdout
    if store.last_finished_attempt(lesson.id) is None:
        out.write(f"No finished attempt at {lesson.title} yet: take the quiz first.\n")
        return
    wrong = last_wrong_answers(lesson, store)
    if not wrong:
        out.write("Your last finished attempt had no wrong answers.\n")
        return
    out.write(f"Your last finished attempt: {plural(len(wrong), 'wrong answer')}.\n")
    for number, item in enumerate(wrong, 1):
        question = item.question
        out.write(
            f"\n{number}. {question.stem}\n"
            f"✗ You answered {choice_text(question, item.chosen)}\n"
            f"✓ The answer is {choice_text(question, question.answer)}\n"
            f"Why: {question.explanation}\n(See the lesson section “{question.source}”.)\n"
        )


def _plain_quiz(lesson: Lesson, store: Store, restart: bool) -> bool:
    """The quiz on stdout, answers from stdin; whether it reached the end."""
    from tutor.progress.quiz import QuizError, QuizSession, choice_keys, choice_text

    out = sys.stdout
    pending = store.open_attempt(lesson.id)
    if pending is not None and restart:
        store.abandon_attempt(pending.attempt_id)
        pending = None
    session = QuizSession(lesson, store, resume=pending)
    if pending is not None:
        out.write(
            f"Resuming your unfinished quiz started {when(pending.started_at)} "
            f"({len(session.results)} of {session.total} answered). Use --restart to start over.\n"
        )
    out.write(f"{lesson.title}: {session.total} questions. Answer each with its letter or number.\n")
    # Piped answers are not echoed by a terminal: write each one after its prompt, as typed.
    echo = not sys.stdin.isatty()
    while not session.finished:
        question = session.current
        out.write(f"\nQuestion {session.index + 1} of {session.total}: {question.stem}\n")
        for letter in LETTERS[: len(question.choices)]:
            out.write(f"  {choice_text(question, letter)}\n")
        while True:
            out.write(f"Your answer ({choice_keys(question)}): ")
            out.flush()
            line = sys.stdin.readline()
            if not line:
                out.write(
                    f"\nStopped after {len(session.results)} of {session.total}; your answers are saved. "
                    f"Run the same command to resume.\n"
                )
                return False
            if echo:
                out.write(line if line.endswith("\n") else line + "\n")
            try:
                feedback = session.answer(line)
                break
            except QuizError as exc:
                out.write(f"{exc}\n")  # the prompt again, not the whole question
        out.write(f"You chose {choice_text(question, feedback.chosen)}\n")
        if feedback.correct:
            out.write(f"✓ Correct. {feedback.chosen_feedback}\n")
        else:
            out.write(f"✗ Not quite. {feedback.chosen_feedback}\n")
            out.write(f"The answer is {choice_text(question, question.answer)}\n")
        out.write(f"Why: {question.explanation}\n(See the lesson section “{question.source}”.)\n")
    out.write(f"\nScore: {session.score}/{session.total}\n")
    if session.wrong_ids():
        out.write(f"See what you missed: quant-tutor quiz {lesson.id} --plain --review\n")
    return True
