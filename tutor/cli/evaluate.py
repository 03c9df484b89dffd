"""``quant-tutor eval``: score retrieval, the quote and the support check on the evaluation sets,
and with ``--generate`` the model's own sentences.

Imported only when it runs (``tutor.cli``'s lazy group); it loads the lesson index, and the model
only with ``--generate``, through :mod:`tutor.cli.model`'s helpers.
"""

from __future__ import annotations

import json
import sys

import click

from tutor.cli import CliError, Session, library, pass_session
from tutor.cli.model import load_model, load_retriever, model_options
from tutor.engine.precisions import MEASURED


@click.command(
    "eval",
    help="score retrieval, the quote and the support check on the evaluation sets (no model)\n\n"
    "SET: tuning, heldout, or a YAML file in their layout (default: both shipped sets)",
)
@click.argument("sets", nargs=-1, metavar="[SET]...")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON, one object per set")
@click.option("--details", is_flag=True, help="also list every miss")
@click.option(
    "--generate",
    type=int,
    default=0,
    metavar="N",
    help="also ask N questions of each set at every precision and check the model's sentences",
)
@click.option(
    "--precisions", default=",".join(MEASURED), help=f"with --generate (default: {','.join(MEASURED)})"
)
@click.option("--alphas", help="with --generate: context-aware decoding alphas to compare, e.g. 0,0.5,1")
@click.option(
    "--openings",
    type=click.Choice(["plain", "quote", "both"]),
    help="with --generate: the model starts from nothing (plain), continues after the quote, or both "
    "(default: the tutor's own)",
)
@model_options
@pass_session
def eval_command(
    session: Session,
    sets: tuple[str, ...],
    as_json: bool,
    details: bool,
    generate: int,
    precisions: str,
    alphas: str | None,
    openings: str | None,
    model: str | None,
    device: str,
) -> None:
    from tutor.assistant.evaluation import (
        EvalSetError,
        answers_table,
        evaluate,
        evaluate_answers,
        load_eval_set,
    )
    from tutor.engine.errors import EngineError
    from tutor.engine.precisions import parse_precisions

    out, err = sys.stdout, sys.stderr
    try:
        eval_sets = [load_eval_set(name) for name in sets or ("tuning", "heldout")]
    except EvalSetError as exc:
        raise CliError(str(exc)) from None
    try:
        measured = parse_precisions(precisions) if generate else []
    except EngineError as exc:
        raise CliError(f"--precisions: {exc}") from None
    try:
        alpha_values = [float(a) for a in alphas.split(",")] if alphas else None
    except ValueError:
        raise CliError(f"--alphas: expected numbers such as 0,0.5,1, not {alphas!r}") from None
    retriever = load_retriever(library(session), err)
    engine = load_model(model, device, err) if generate else None
    results = []
    for eval_set in eval_sets:
        try:
            figures = evaluate(retriever, eval_set)
        except KeyError as exc:  # a claim naming a section no lesson has
            raise CliError(f"{eval_set.name}: {exc.args[0]}") from None
        result = figures.as_dict()
        if not as_json:
            out.write(figures.report() + "\n")
            if details:
                out.write(figures.details() + "\n")
        if engine is not None:
            err.write(f"{eval_set.name}: asking {generate} questions at {', '.join(measured)}…\n")
            starts = {None: None, "plain": [False], "quote": [True], "both": [False, True]}[openings]
            rows = evaluate_answers(engine, retriever, eval_set, measured, generate, alpha_values, starts)
            result["answers"] = [row.as_dict() for row in rows]
            if not as_json:
                out.write(answers_table(eval_set.name, rows) + "\n")
        results.append(result)
    if as_json:
        json.dump(results, out, indent=2)
        out.write("\n")
