"""The ``quant-tutor`` console script: plain subcommands, or the Textual app."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tutor import cli


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse(argv)
    if args.command == "bench" and "--app" in args.rest:
        # It drives the Textual app, which the domain's own bench may not import.
        from tui.app_bench import main as bench_app

        return bench_app([a for a in args.rest if a != "--app"])
    if args.command is not None:
        return cli.run(args)
    from tui.launch import launch

    launched = launch(args.content, args.lesson, args.model, args.device, args.app_engine, args.app_variants)
    if isinstance(launched, int):
        return launched
    # Imported only now: plain commands and --version never pay for textual, and the engine
    # process is already importing its own while textual loads.
    from tui.app import run_app

    return run_app(launched)


if __name__ == "__main__":
    sys.exit(main())
