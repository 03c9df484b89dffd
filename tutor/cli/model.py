"""The commands that load the model: ``ask`` and ``cliff``, and the helpers they share with
``eval`` (:mod:`tutor.cli.evaluate`): loading the model and the lesson index with progress,
connecting a remote engine, the ``--engine``/``--model`` options.

Imported only when one of them runs (``tutor.cli``'s lazy group), so the plain commands stay
instant; the engine itself is imported inside each command.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from tutor.cli import PATH, CliError, Session, library, pass_session
from tutor.engine.precisions import MEASURED
from tutor.library.content import Library

if TYPE_CHECKING:
    from tutor.assistant.retrieval import Retriever
    from tutor.engine import Engine
    from tutor.engine.remote import RemoteEngine
    from tutor.engine.reports import LoadProgress
    from tutor.engine.settings import EngineSettings


def _progress_printer(err: TextIO) -> Any:
    last = {"stage": ""}

    def show(progress: LoadProgress) -> None:
        if progress.stage != last["stage"] or progress.done == progress.total:
            last["stage"] = progress.stage
            err.write(f"  {progress.stage}: {progress.done}/{progress.total} {progress.message}\n")
            err.flush()

    return show


def _counter(err: TextIO) -> Callable[[str, int, int], None]:
    """``progress(what, done, total)``: one line per phase, rewritten in place as it counts."""

    def show(what: str, done: int, total: int) -> None:
        err.write(f"\r  {what}: {done}/{total}" + ("\n" if done == total else ""))
        err.flush()

    return show


def load_model(model: str | None, device: str, err: TextIO) -> Engine:
    from tutor.engine import Engine, EngineError

    err.write("Loading the tutor's model (the first run converts the embedded checkpoint once)…\n")
    try:
        return Engine.load(model, device=device, progress=_progress_printer(err))
    except EngineError as exc:
        raise CliError(str(exc)) from None


def connect_remote(settings: EngineSettings, precision: str | None) -> RemoteEngine:
    """The OpenAI-compatible server ``settings`` name, or the command's one-line error."""
    from tutor.engine.remote import RemoteError

    try:
        return settings.connect(precision)
    except RemoteError as exc:
        raise CliError(str(exc)) from None


def _settings(engine: str | None, variants: Path | None) -> EngineSettings:
    """The engine ``--engine``/``--variants`` or the config file name."""
    from tutor.engine.remote import RemoteError
    from tutor.engine.settings import engine_settings

    try:
        return engine_settings(engine, variants)
    except RemoteError as exc:
        raise CliError(str(exc)) from None


def _estimate_remotely(
    settings: EngineSettings,
    library: Library,
    precisions: list[str],
    max_windows: int | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> None:
    """``cliff --engine URL``: PPL and a top-k KL estimate from the server's log-probabilities."""
    from rich.console import Console
    from rich.table import Table

    from tutor.engine.remote import RemoteError
    from tutor.lab.remote_estimate import WINDOWS, estimate_rows, method_text

    remote = connect_remote(settings, None)
    err.write(f"Estimating on {settings.url} (PPL and KL from the log-probabilities it returns)…\n")

    windows = max_windows or WINDOWS
    try:
        rows = estimate_rows(remote, library, precisions, windows=windows, progress=_counter(err))
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    method = method_text(rows, windows, settings.url or "")
    if as_json:
        json.dump({"rows": [r.as_dict() for r in rows], "method": method, "estimate": True}, out, indent=2)
        out.write("\n")
        return
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


def _embed_quotables(retriever: Retriever, err: TextIO, step: int = 256) -> None:
    """Every lesson's quotable sentences embedded and kept (``text_vectors``): no question
    embeds them at its first token. Those kept already are read back, not embedded again."""
    from tutor.assistant.grounding import quotable_texts
    from tutor.assistant.text_vectors import STORE_LIMIT

    # A big library's beyond what the store keeps would be embedded only to be dropped.
    texts = quotable_texts(retriever, list(retriever.library.lessons))[:STORE_LIMIT]
    count = _counter(err)
    for start in range(0, len(texts), step):
        count("embedding the lessons' sentences", start, len(texts))
        retriever.embed(texts[start : start + step])
    count("embedding the lessons' sentences", len(texts), len(texts))


def load_retriever(library: Library, err: TextIO) -> Retriever:
    from tutor.assistant.retrieval import Retriever

    err.write("Loading the lesson index…\n")
    return Retriever.load(library)


def _switch(engine: Engine, precision: str) -> None:
    from tutor.engine import EngineError

    try:
        engine.switch(precision, wait=True)
    except EngineError as exc:
        raise CliError(str(exc)) from None


def _read_questions(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read questions file {path}: {exc}") from None
    questions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise CliError(f"{path} has no questions (one per line)")
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


# tutor.lab.cliff's PLANS by name (importing tutor.lab.cliff here would slow `cliff --help`).
CLIFF_PLANS = ("quick", "claims", "full")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def engine_options(what: str, servers: str) -> Decorator:
    """``--engine URL`` and ``--variants TOML``: ``what`` the command does on a remote server."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option(
            "--variants", type=PATH, metavar="TOML", help='with --engine: precision = "served model id" lines'
        )(command)
        return click.option(
            "--engine",
            metavar="URL",
            help=f"{what} an OpenAI-compatible server (…/v1: {servers}; its API key from "
            "$QUANT_TUTOR_REMOTE_KEY), or local (default: the config file's, else local)",
        )(command)

    return decorate


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--model`` and ``--device``: the local model a command loads."""
    command = click.option("--device", default="cpu", help="cpu (default) or cuda")(command)
    return click.option(
        "--model", help="local HF folder, .gguf file or hub id (default: the embedded model)"
    )(command)


@click.command(
    help="ask the tutor; it answers from the lessons with the local model\n\n"
    "QUESTION: the question (or use --questions)"
)
@click.argument("question", required=False)
@click.option("--questions", type=PATH, help="a file with one question per line (model loaded once)")
@click.option("--lesson", metavar="ID", help="prefer passages from this lesson")
@click.option(
    "--precision", help="bf16 (default), fp32, int8, int8-wo, nf4, fp4, int4, gptq4; with --engine: a variant"
)
@click.option("--json", "as_json", is_flag=True, help="print JSON (an array with --questions)")
@engine_options("generate on", "vLLM, llama-server, Ollama, quant-tutor serve")
@model_options
@pass_session
def ask(
    session: Session,
    question: str | None,
    questions: Path | None,
    lesson: str | None,
    precision: str | None,
    as_json: bool,
    engine: str | None,
    variants: Path | None,
    model: str | None,
    device: str,
) -> None:
    from tutor.assistant.tutor_chat import ask as answer_question
    from tutor.engine import EngineError

    out, err = sys.stdout, sys.stderr
    if bool(question) == bool(questions):
        raise CliError("give one QUESTION or --questions FILE")
    lessons = library(session)
    if lesson and lesson not in lessons.lessons:
        raise CliError(f"no lesson {lesson!r}; known lessons: {', '.join(lessons.lessons)}")
    asked = _read_questions(questions) if questions else [question or ""]
    generator: Engine | RemoteEngine
    settings = _settings(engine, variants)
    if settings.url:  # reached first: a wrong URL or key is said before the index loads
        generator = connect_remote(settings, precision)
        retriever = load_retriever(lessons, err)
    else:
        retriever = load_retriever(lessons, err)
        generator = load_model(model, device, err)
        _switch(generator, precision or "bf16")
    answers = []

    def cut_notice(prepared: Any) -> None:
        if prepared.question_cut:
            err.write(f"quant-tutor: question cut to {len(prepared.question)} characters\n")

    for text in asked:
        try:
            answer = answer_question(text, retriever, generator, lesson, on_prepared=cut_notice)
        except EngineError as exc:  # e.g. the remote server went away after it answered once
            raise CliError(str(exc)) from None
        answers.append(answer)
        if not as_json:
            _print_answer(answer, out)
    if as_json:
        data: Any = [a.as_dict() for a in answers]
        json.dump(data if questions else data[0], out, indent=2, ensure_ascii=False)
        out.write("\n")


@click.command(help="measure quality against bf16 at every precision: PPL, KL, top-1, QA")
@click.option(
    "--precisions", default=",".join(MEASURED), help=f"comma-separated (default: {','.join(MEASURED)})"
)
@click.option("--json", "as_json", is_flag=True, help='print {"rows", "weight_lab", "method", "machine"}')
@click.option("--window", type=int, default=256, help="tokens per window (default: 256)")
@click.option("--windows", type=int, help="use only the first N windows (default: all lesson text)")
@click.option(
    "--qa", type=int, help="QA questions answered per precision (0: skip; default: the plan's, 8 or 0)"
)
@click.option(
    "--plan",
    type=click.Choice(CLIFF_PLANS),
    default="full",
    help="quick: the table on a few windows, no QA (the Lab's m); claims: the same table, then the "
    "lesson's claims as experiments (e); full: all lesson text, QA and every claim (M; default)",
)
@click.option("--quick", is_flag=True, help="the same as --plan quick")
@engine_options("estimate PPL and KL from the prompt log-probabilities of", "vLLM, quant-tutor serve")
@model_options
@pass_session
def cliff(
    session: Session,
    precisions: str,
    as_json: bool,
    window: int,
    windows: int | None,
    qa: int | None,
    plan: str,
    quick: bool,
    engine: str | None,
    variants: Path | None,
    model: str | None,
    device: str,
) -> None:
    from tutor.engine import EngineError
    from tutor.engine.precisions import parse_precisions
    from tutor.lab.cliff import PLANS, QUICK, run_cliff
    from tutor.lab.measure import QualityRow

    out, err = sys.stdout, sys.stderr
    try:
        measured = parse_precisions(precisions)
    except EngineError as exc:
        raise CliError(str(exc)) from None
    lessons = library(session)
    settings = _settings(engine, variants)
    if settings.url:
        _estimate_remotely(settings, lessons, measured, windows, as_json, out, err)
        return
    chosen = QUICK if quick else PLANS[plan]
    qa_questions = chosen.qa_questions if qa is None else qa
    loaded = load_model(model, device, err)
    retriever = load_retriever(lessons, err) if qa_questions else None
    err.write(f"Measuring the {chosen.name} plan (cached results are reused)…\n")

    def on_row(row: QualityRow) -> None:
        cells = row.cells()
        err.write(
            f"  {cells[0]}: PPL {cells[2]} (×{cells[3]}), KL {cells[4]}, same top token {cells[5]}, "
            f"QA F1 {cells[6]}, grounded {cells[7]}\n"
        )
        err.flush()

    result = run_cliff(
        loaded,
        lessons,
        measured,
        plan=chosen,
        retriever=retriever,
        qa_questions=qa_questions,
        max_windows=windows,
        window=window,
        progress=_counter(err),
        on_row=on_row,
    )
    if as_json:
        json.dump(result.as_dict(), out, indent=2)
        out.write("\n")
        return
    from rich.console import Console

    console = Console(file=out)
    for table in result.tables():
        console.print(table)
    console.print("\n".join([f"Method: {result.method}", *(s.method for s in result.sections)]))
    console.print(f"Machine: {result.machine}")


@click.command(
    help="convert the model, index the lessons and calibrate gptq4 now, once: the app then opens "
    "ready and the Lab's first measure does not wait for them (make install runs this)"
)
@model_options
@pass_session
def warm(session: Session, model: str | None, device: str) -> None:
    import time

    err = sys.stderr
    started = time.perf_counter()
    lessons = library(session)
    retriever = load_retriever(lessons, err)
    retriever.warm()  # every lesson indexed and cached, the fields elsewhere too
    _embed_quotables(retriever, err)
    loaded = load_model(model, device, err)
    # gptq4 runs on the int4 kernel, which is CPU-only
    if loaded.device == "cpu" and loaded.gptq.report() is None:
        err.write("Calibrating gptq4 (once per machine)…\n")
        count = _counter(err)
        report = loaded.gptq.calibrate(lambda done, total: count("calibrating gptq4", done, total))
        err.write(f"  gptq4: calibrated in {report.seconds:.0f} s\n")
    took = time.perf_counter() - started
    cached = "the model, the lesson index, the lessons' sentences and gptq4's codes"
    err.write(f"Ready: {cached} are cached ({took:.0f} s).\n")
