"""The ``quant-tutor`` console script: ``tutor.cli``'s commands, and with none the Textual app.

``tutor.cli`` never imports textual or ``tui``: this module hands it what only the app side
has, the app itself (:func:`open_app`) and the app's bench (``bench --app``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from tutor import cli


def open_app(options: cli.AppOptions) -> int:
    """``quant-tutor`` with no command: the engine process starts, then the app opens."""
    from tui.launch import launch

    launched = launch(
        options.content, options.lesson, options.model, options.device, options.engine, options.variants
    )
    if isinstance(launched, int):
        return launched
    # Imported only now: plain commands and --version never pay for textual, and the engine
    # process is already importing its own while textual loads.
    from tui.app import run_app

    return run_app(launched)


def bench_app() -> click.Command:
    """``quant-tutor bench --app``: it drives the Textual app, which the engine's bench may not import."""
    from tui.app_bench import command

    return command


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(argv, open_app=open_app, bench_app=bench_app)


if __name__ == "__main__":
    sys.exit(main())
