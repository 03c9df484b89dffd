"""The ``quant-tutor`` command line: plain subcommands for screen readers and scripts.

``tui.entry`` owns the console script: with no subcommand it launches the Textual
app, otherwise it hands the parsed arguments to :func:`run` here. Nothing in this
module imports textual, and heavy libraries load only inside the commands that
need them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from tutor import __version__
from tutor.engine.precisions import MEASURED
from tutor.library.content import Library, json_schema, load_library, validate_library
from tutor.library.models import LETTERS, QUIZ_LENGTH, ContentFileError, Lesson
from tutor.library.plain import plain_text
from tutor.progress.database import StoreError
from tutor.progress.records import LessonSummary
from tutor.progress.store import Store
from tutor.text import plural, when

# tutor.lab.cliff's PLANS by name (importing tutor.lab.cliff here would slow every command's start).
CLIFF_PLANS = ("quick", "claims", "full")

# Subcommands whose own argparse lives with the code they run (imported only then).
DELEGATED = {
    "bench": ("tutor.engine.bench", "Measure every precision side by side: memory, switch time, speed."),
    "serve": ("tutor.service.server", "Run the tutor's model as an OpenAI-compatible server."),
}


class CliError(Exception):
    """A problem the learner can fix; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quant-tutor",
        description="Learn AI model quantization in your terminal. With no command, opens the app.",
    )
    parser.add_argument("--version", action="version", version=f"quant-tutor {__version__}")
    parser.add_argument("--content", type=Path, help="lesson folder to use instead of the shipped one")
    parser.add_argument("--lesson", help="open the app at this lesson id")
    parser.add_argument("--model", help="the tutor's model: local HF folder, .gguf file or hub id")
    parser.add_argument("--device", default="cpu", help="where the tutor's model runs: cpu (default) or cuda")
    # Not dest="engine": `ask --engine` has its own, and a subcommand's default would overwrite it.
    parser.add_argument(
        "--engine",
        dest="app_engine",
        metavar="URL",
        help="the tutor's replies from this OpenAI-compatible server (vLLM, llama-server, Ollama, "
        "quant-tutor serve; its key in QUANT_TUTOR_REMOTE_KEY), or local (default: the config file's, "
        "else local)",
    )
    parser.add_argument(
        "--variants",
        dest="app_variants",
        type=Path,
        metavar="TOML",
        help='with --engine: precision = "served model id" lines (default: the ids the server lists)',
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    lessons = sub.add_parser("lessons", help="list the lessons")
    lessons.add_argument("--json", action="store_true", help="print a JSON list")

    read = sub.add_parser("read", help="print a lesson as plain text")
    read.add_argument("lesson", help="lesson id (see `quant-tutor lessons`)")

    quiz = sub.add_parser("quiz", help="take a lesson's quiz")
    quiz.add_argument("lesson", help="lesson id")
    quiz.add_argument(
        "--plain", action="store_true", help="questions on stdout, one answer letter per line on stdin"
    )
    quiz.add_argument("--restart", action="store_true", help="start over instead of resuming")
    quiz.add_argument(
        "--review", action="store_true", help="show the wrong answers of your last finished attempt and stop"
    )

    progress = sub.add_parser("progress", help="show progress per lesson")
    progress.add_argument("--json", action="store_true", help="print JSON keyed by lesson id")

    sub.add_parser("schema", help="print the JSON Schema of lesson.md front matter and quiz.yaml")

    validate = sub.add_parser(
        "validate", help="check every lesson whole (front matter, body, quiz, related ids); exit 1 on errors"
    )
    validate.add_argument(
        "folder", nargs="?", type=Path, help="the lesson folder (default: --content, or the shipped lessons)"
    )

    from tutor.cli.model import add_engine_options, add_model_options

    ask = sub.add_parser("ask", help="ask the tutor; it answers from the lessons with the local model")
    ask.add_argument("question", nargs="?", help="the question (or use --questions)")
    ask.add_argument("--questions", type=Path, help="a file with one question per line (model loaded once)")
    ask.add_argument("--lesson", dest="ask_lesson", metavar="ID", help="prefer passages from this lesson")
    ask.add_argument(
        "--precision",
        help="bf16 (default), fp32, int8, int8-wo, nf4, fp4, int4, gptq4; with --engine: a variant",
    )
    ask.add_argument("--json", action="store_true", help="print JSON (an array with --questions)")
    add_engine_options(ask, "generate on", "vLLM, llama-server, Ollama, quant-tutor serve")
    add_model_options(ask)

    cliff = sub.add_parser(
        "cliff", help="measure quality against bf16 at every precision: PPL, KL, top-1, QA"
    )
    cliff.add_argument(
        "--precisions", default=",".join(MEASURED), help="comma-separated (default: %(default)s)"
    )
    cliff.add_argument(
        "--json", action="store_true", help='print {"rows", "weight_lab", "method", "machine"}'
    )
    cliff.add_argument("--window", type=int, default=256, help="tokens per window (default: %(default)s)")
    cliff.add_argument("--windows", type=int, help="use only the first N windows (default: all lesson text)")
    cliff.add_argument(
        "--qa", type=int, help="QA questions answered per precision (0: skip; default: the plan's, 8 or 0)"
    )
    cliff.add_argument(
        "--plan",
        choices=CLIFF_PLANS,
        default="full",
        help="quick: the table on a few windows, no QA (the Lab's m); claims: the same table, then the "
        "lesson's claims as experiments (e); full: all lesson text, QA and every claim (M; default)",
    )
    cliff.add_argument("--quick", action="store_true", help="the same as --plan quick")
    add_engine_options(
        cliff, "estimate PPL and KL from the prompt log-probabilities of", "vLLM, quant-tutor serve"
    )
    add_model_options(cliff)

    evaluate = sub.add_parser(
        "eval", help="score retrieval, the quote and the support check on the evaluation sets (no model)"
    )
    evaluate.add_argument(
        "sets", nargs="*", default=["tuning", "heldout"], metavar="SET",
        help="tuning, heldout, or a YAML file in their layout (default: both shipped sets)",
    )  # fmt: skip
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON, one object per set")
    evaluate.add_argument("--details", action="store_true", help="also list every miss")
    evaluate.add_argument(
        "--generate", type=int, default=0, metavar="N",
        help="also ask N questions of each set at every precision and check the model's sentences",
    )  # fmt: skip
    evaluate.add_argument(
        "--precisions", default=",".join(MEASURED), help="with --generate (default: %(default)s)"
    )
    evaluate.add_argument(
        "--alphas", help="with --generate: context-aware decoding alphas to compare, e.g. 0,0.5,1"
    )
    evaluate.add_argument(
        "--openings", choices=["plain", "quote", "both"],
        help="with --generate: the model starts from nothing (plain), continues after the quote, or both "
        "(default: the tutor's own)",
    )  # fmt: skip
    add_model_options(evaluate)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (see `quant-tutor {name} --help`)", add_help=False)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in DELEGATED:
        # Their options are theirs: argparse.REMAINDER would refuse ones that start with '-'.
        return argparse.Namespace(command=args[0], rest=args[1:])
    return build_parser().parse_args(args)


def _library(args: argparse.Namespace, err: TextIO) -> Library:
    library = load_library(args.content)
    for error in library.errors:
        print(f"quant-tutor: warning: {error}", file=err)
    return library


def _lesson(library: Library, lesson_id: str) -> Lesson:
    try:
        return library.get(lesson_id)
    except KeyError as exc:
        raise CliError(exc.args[0]) from None
    except ContentFileError as exc:
        raise CliError(f"lesson {lesson_id!r} cannot be opened:\n{exc}") from None


def _open_store(err: TextIO) -> Store:
    try:
        store = Store()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    if store.notice:
        print(f"quant-tutor: {store.notice}", file=err)
    return store


def cmd_lessons(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    library = _library(args, err)
    rows = [{"id": x.id, "title": x.title, "minutes": x.minutes} for x in library.lessons.values()]
    if args.json:
        json.dump(rows, out, ensure_ascii=False, indent=2)
        out.write("\n")
    else:
        for row in rows:
            out.write(f"{row['id']}  ({row['minutes']} min)  {row['title']}\n")
    return 0


def cmd_read(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(plain_text(_lesson(_library(args, err), args.lesson)))
    return 0


def cmd_schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    json.dump(json_schema(), out, indent=2, ensure_ascii=False)
    out.write("\n")
    return 0


def cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    library = validate_library(args.folder or args.content)
    for error in library.errors:
        print(error, file=err)
    if library.errors:
        print(f"{plural(len(library.errors), 'problem')} in {library.root}", file=err)
        return 1
    out.write(f"{plural(len(library.lessons), 'lesson')} in {library.root}: all valid\n")
    return 0


def cmd_progress(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    library = _library(args, err)
    store = _open_store(err)
    try:
        summaries = store.summaries()
    finally:
        store.close()
    rows: dict[str, dict[str, Any]] = {}
    for entry in library.lessons.values():
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
    if args.json:
        json.dump(rows, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    for lesson_id, row in rows.items():
        quiz = (
            "quiz not taken"
            if row["best_score"] is None
            else f"best {row['best_score']}/{row['questions']} over {plural(row['attempts'], 'attempt')}"
        )
        steps = f"{row['steps_done']}/{row['steps_total']}"
        out.write(f"{lesson_id}: read {row['read_percent']}%, steps {steps}, {quiz}\n")
    return 0


def cmd_quiz(args: argparse.Namespace, out: TextIO, err: TextIO, read_line: Callable[[], str]) -> int:
    if not args.plain:
        raise CliError(
            "the interactive quiz is in the app (run `quant-tutor`); add --plain for the text quiz"
        )
    lesson = _lesson(_library(args, err), args.lesson)
    store = _open_store(err)
    try:
        if args.review:
            return _review(lesson, store, out)
        return _plain_quiz(args, lesson, store, out, read_line)
    finally:
        store.close()


def _review(lesson: Lesson, store: Store, out: TextIO) -> int:
    from tutor.progress.quiz import choice_text, last_wrong_answers

    if store.last_finished_attempt(lesson.id) is None:
        out.write(f"No finished attempt at {lesson.title} yet: take the quiz first.\n")
        return 0
    wrong = last_wrong_answers(lesson, store)
    if not wrong:
        out.write("Your last finished attempt had no wrong answers.\n")
        return 0
    out.write(f"Your last finished attempt: {plural(len(wrong), 'wrong answer')}.\n")
    for number, item in enumerate(wrong, 1):
        question = item.question
        out.write(
            f"\n{number}. {question.stem}\n"
            f"✗ You answered {choice_text(question, item.chosen)}\n"
            f"✓ The answer is {choice_text(question, question.answer)}\n"
            f"Why: {question.explanation}\n(See the lesson section “{question.source}”.)\n"
        )
    return 0


def _plain_quiz(
    args: argparse.Namespace, lesson: Lesson, store: Store, out: TextIO, read_line: Callable[[], str]
) -> int:
    from tutor.progress.quiz import QuizError, QuizSession, choice_keys, choice_text

    pending = store.open_attempt(lesson.id)
    if pending is not None and args.restart:
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
    echo = not _is_terminal(read_line)
    while not session.finished:
        question = session.current
        out.write(f"\nQuestion {session.index + 1} of {session.total}: {question.stem}\n")
        for letter in LETTERS[: len(question.choices)]:
            out.write(f"  {choice_text(question, letter)}\n")
        while True:
            out.write(f"Your answer ({choice_keys(question)}): ")
            out.flush()
            line = read_line()
            if not line:
                out.write(
                    f"\nStopped after {len(session.results)} of {session.total}; your answers are saved. "
                    f"Run the same command to resume.\n"
                )
                return 1
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
    return 0


def _is_terminal(read_line: Callable[[], str]) -> bool:
    """Whether answers come from a terminal (which echoes them itself)."""
    return read_line == sys.stdin.readline and sys.stdin.isatty()


def cmd_model(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from tutor.cli.model import run_model_command

    return run_model_command(args.command, args, _library(args, err), out)


def run(
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    read_line: Callable[[], str] | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    commands: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
        "lessons": cmd_lessons,
        "read": cmd_read,
        "schema": cmd_schema,
        "validate": cmd_validate,
        "progress": cmd_progress,
        "quiz": lambda a, o, e: cmd_quiz(a, o, e, read_line or sys.stdin.readline),
        "ask": cmd_model,
        "cliff": cmd_model,
        "eval": cmd_model,
    }
    try:
        if args.command in DELEGATED:
            import importlib

            module = importlib.import_module(DELEGATED[args.command][0])
            return int(module.main(list(args.rest)))
        return commands[args.command](args, out, err)
    except CliError as exc:
        print(f"quant-tutor: {exc}", file=err)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("\nquant-tutor: interrupted; everything answered so far is saved.", file=err)
        return 130
