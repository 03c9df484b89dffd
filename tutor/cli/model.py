"""The command-line commands that load the model: ``ask`` and ``cliff``.

Imported only when one of them runs, so the plain commands stay instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tutor.library.content import Library

if TYPE_CHECKING:
    from tutor.assistant.retrieval import Retriever
    from tutor.engine import Engine
    from tutor.engine.remote import RemoteEngine
    from tutor.engine.reports import LoadProgress
    from tutor.engine.settings import EngineSettings


class ModelCommandError(Exception):
    """A problem loading or using the model, said in one line."""


def _progress_printer(err: TextIO) -> Any:
    last = {"stage": ""}

    def show(progress: LoadProgress) -> None:
        if progress.stage != last["stage"] or progress.done == progress.total:
            last["stage"] = progress.stage
            err.write(f"  {progress.stage}: {progress.done}/{progress.total} {progress.message}\n")
            err.flush()

    return show


def load_model(args: argparse.Namespace, err: TextIO) -> Engine:
    from tutor.engine import Engine, EngineError

    err.write("Loading the tutor's model (the first run converts the embedded checkpoint once)…\n")
    try:
        return Engine.load(args.model, device=args.device, progress=_progress_printer(err))
    except EngineError as exc:
        raise ModelCommandError(str(exc)) from None


def connect_remote(settings: EngineSettings, precision: str | None) -> RemoteEngine:
    """The OpenAI-compatible server ``settings`` name, or the command's one-line error."""
    from tutor.engine.remote import RemoteError

    try:
        return settings.connect(precision)
    except RemoteError as exc:
        raise ModelCommandError(str(exc)) from None


def _settings(args: argparse.Namespace) -> EngineSettings:
    """The engine ``--engine``/``--variants`` or the config file name."""
    from tutor.engine.remote import RemoteError
    from tutor.engine.settings import engine_settings

    try:
        return engine_settings(args.engine, args.variants)
    except RemoteError as exc:
        raise ModelCommandError(str(exc)) from None


def _estimate_remotely(
    settings: EngineSettings,
    args: argparse.Namespace,
    library: Library,
    precisions: list[str],
    out: TextIO,
    err: TextIO,
) -> int:
    """``cliff --engine URL``: PPL and a top-k KL estimate from the server's log-probabilities."""
    from rich.console import Console
    from rich.table import Table

    from tutor.engine.remote import RemoteError
    from tutor.lab.remote_estimate import WINDOWS, estimate_rows, method_text

    remote = connect_remote(settings, None)
    err.write(f"Estimating on {settings.url} (PPL and KL from the log-probabilities it returns)…\n")

    def progress(what: str, done: int, total: int) -> None:
        err.write(f"\r  {what}: {done}/{total}" + ("\n" if done == total else ""))
        err.flush()

    windows = args.windows or WINDOWS
    try:
        rows = estimate_rows(remote, library, precisions, windows=windows, progress=progress)
    except RemoteError as exc:
        raise ModelCommandError(str(exc)) from None
    method = method_text(rows, windows, settings.url or "")
    if args.json:
        json.dump({"rows": [r.as_dict() for r in rows], "method": method, "estimate": True}, out, indent=2)
        out.write("\n")
        return 0
    table = Table(title=f"The quality cliff, estimated on {settings.url}")
    for column in ("precision", "served as", "PPL", "PPL×", "KL (estimate)", "same top token", "tokens"):
        table.add_column(column, justify="left" if column in ("precision", "served as") else "right")
    for row in rows:
        table.add_row(
            row.precision,
            row.served,
            f"{row.ppl:.2f}",
            f"{row.ppl_ratio:.3f}",
            f"{row.kl_estimate:.4f}",
            f"{100 * row.same_top:.1f}%",
            str(row.tokens),
        )
    console = Console(file=out)
    console.print(table)
    console.print(method)
    return 0


def load_retriever(library: Library, err: TextIO) -> Retriever:
    from tutor.assistant.retrieval import Retriever

    err.write("Loading the lesson index…\n")
    return Retriever.load(library)


def _switch(engine: Engine, precision: str) -> None:
    from tutor.engine import EngineError

    try:
        engine.switch(precision, wait=True)
    except EngineError as exc:
        raise ModelCommandError(str(exc)) from None


def _read_questions(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCommandError(f"cannot read questions file {path}: {exc}") from None
    questions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise ModelCommandError(f"{path} has no questions (one per line)")
    return questions


def _print_answer(answer: Any, out: TextIO) -> None:
    out.write(f"Q: {answer.question}\n")
    if not answer.grounded:
        out.write(f"{answer.answer}\n\n")
        return
    quote = answer.quote
    where = f" ({quote.section})" if quote else ""
    out.write(f"From the lesson{where}: “{answer.answer}”\n")
    out.write(f"Tutor ({answer.precision}): {answer.generated}\n")
    for check in answer.sentences:
        out.write(f"  {check.mark}: {check.text}\n")
    out.write(f"  [{answer.stats.describe(answer.precision)}]\n\n")


def cmd_ask(args: argparse.Namespace, library: Library, out: TextIO, err: TextIO) -> int:
    from tutor.assistant.tutor_chat import ask
    from tutor.engine import EngineError

    if bool(args.question) == bool(args.questions):
        raise ModelCommandError("give one QUESTION or --questions FILE")
    if args.ask_lesson and args.ask_lesson not in library.lessons:
        raise ModelCommandError(f"no lesson {args.ask_lesson!r}; known lessons: {', '.join(library.lessons)}")
    questions = _read_questions(args.questions) if args.questions else [args.question]
    engine: Engine | RemoteEngine
    settings = _settings(args)
    if settings.url:  # reached first: a wrong URL or key is said before the index loads
        engine = connect_remote(settings, args.precision)
        retriever = load_retriever(library, err)
    else:
        retriever = load_retriever(library, err)
        engine = load_model(args, err)
        _switch(engine, args.precision or "bf16")
    answers = []

    def cut_notice(prepared: Any) -> None:
        if prepared.question_cut:
            err.write(f"quant-tutor: question cut to {len(prepared.question)} characters\n")

    for question in questions:
        try:
            answer = ask(question, retriever, engine, args.ask_lesson, on_prepared=cut_notice)
        except EngineError as exc:  # e.g. the remote server went away after it answered once
            raise ModelCommandError(str(exc)) from None
        answers.append(answer)
        if not args.json:
            _print_answer(answer, out)
    if args.json:
        data: Any = [a.as_dict() for a in answers]
        json.dump(data if args.questions else data[0], out, indent=2, ensure_ascii=False)
        out.write("\n")
    return 0


def cmd_cliff(args: argparse.Namespace, library: Library, out: TextIO, err: TextIO) -> int:
    from tutor.engine import EngineError
    from tutor.engine.precisions import parse_precisions
    from tutor.lab.cliff import PLANS, QUICK, run_cliff
    from tutor.lab.measure import QualityRow

    try:
        precisions = parse_precisions(args.precisions)
    except EngineError as exc:
        raise ModelCommandError(str(exc)) from None
    settings = _settings(args)
    if settings.url:
        return _estimate_remotely(settings, args, library, precisions, out, err)
    plan = QUICK if getattr(args, "quick", False) else PLANS[getattr(args, "plan", "full")]
    qa = plan.qa_questions if getattr(args, "qa", None) is None else args.qa
    engine = load_model(args, err)
    retriever = load_retriever(library, err) if qa else None
    err.write(f"Measuring the {plan.name} plan (cached results are reused)…\n")

    def progress(what: str, done: int, total: int) -> None:
        err.write(f"\r  {what}: {done}/{total}")
        err.flush()
        if done == total:
            err.write("\n")

    def on_row(row: QualityRow) -> None:
        cells = row.cells()
        err.write(
            f"  {cells[0]}: PPL {cells[2]} (×{cells[3]}), KL {cells[4]}, same top token {cells[5]}, "
            f"QA F1 {cells[6]}, grounded {cells[7]}\n"
        )
        err.flush()

    result = run_cliff(
        engine,
        library,
        precisions,
        plan=plan,
        retriever=retriever,
        qa_questions=qa,
        max_windows=args.windows,
        window=args.window,
        progress=progress,
        on_row=on_row,
    )
    if args.json:
        json.dump(result.as_dict(), out, indent=2)
        out.write("\n")
        return 0
    from rich.console import Console

    console = Console(file=out)
    for table in result.tables():
        console.print(table)
    console.print("\n".join([f"Method: {result.method}", *(s.method for s in result.sections)]))
    console.print(f"Machine: {result.machine}")
    return 0


def cmd_eval(args: argparse.Namespace, library: Library, out: TextIO, err: TextIO) -> int:
    from tutor.assistant.evaluation import (
        EvalSetError,
        answers_table,
        evaluate,
        evaluate_answers,
        load_eval_set,
    )
    from tutor.engine.errors import EngineError
    from tutor.engine.precisions import parse_precisions

    try:
        sets = [load_eval_set(name) for name in args.sets]
    except EvalSetError as exc:
        raise ModelCommandError(str(exc)) from None
    try:
        precisions = parse_precisions(args.precisions) if args.generate else []
    except EngineError as exc:
        raise ModelCommandError(f"--precisions: {exc}") from None
    try:
        alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else None
    except ValueError:
        raise ModelCommandError(f"--alphas: expected numbers such as 0,0.5,1, not {args.alphas!r}") from None
    retriever = load_retriever(library, err)
    engine = load_model(args, err) if args.generate else None
    results = []
    for eval_set in sets:
        try:
            figures = evaluate(retriever, eval_set)
        except KeyError as exc:  # a claim naming a section no lesson has
            raise ModelCommandError(f"{eval_set.name}: {exc.args[0]}") from None
        result = figures.as_dict()
        if not args.json:
            out.write(figures.report() + "\n")
            if args.details:
                out.write(figures.details() + "\n")
        if engine is not None:
            err.write(f"{eval_set.name}: asking {args.generate} questions at {', '.join(precisions)}…\n")
            openings = {None: None, "plain": [False], "quote": [True], "both": [False, True]}[args.openings]
            rows = evaluate_answers(engine, retriever, eval_set, precisions, args.generate, alphas, openings)
            result["answers"] = [row.as_dict() for row in rows]
            if not args.json:
                out.write(answers_table(eval_set.name, rows) + "\n")
        results.append(result)
    if args.json:
        json.dump(results, out, indent=2)
        out.write("\n")
    return 0


def add_engine_options(parser: argparse.ArgumentParser, what: str, servers: str) -> None:
    parser.add_argument(
        "--engine",
        metavar="URL",
        help=f"{what} an OpenAI-compatible server (…/v1: {servers}; its API key from "
        "$QUANT_TUTOR_REMOTE_KEY), or local (default: the config file's, else local)",
    )
    parser.add_argument(
        "--variants", type=Path, metavar="TOML", help='with --engine: precision = "served model id" lines'
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local HF folder, .gguf file or hub id (default: the embedded model)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def run_model_command(name: str, args: argparse.Namespace, library: Library, out: TextIO) -> int:
    commands = {"ask": cmd_ask, "cliff": cmd_cliff, "eval": cmd_eval}
    try:
        return commands[name](args, library, out, sys.stderr)
    except ModelCommandError as exc:
        print(f"quant-tutor: {exc}", file=sys.stderr)
        return 2
