"""A click group whose heavier commands are imported only when they run.

Click's documented pattern ("Lazily Loading Subcommands" in its docs): ``get_command`` imports
a command named in ``lazy_subcommands`` on first use. One step further than the docs' example,
the group's own ``--help`` lists those commands from the summary beside their import path, so
``quant-tutor --help`` imports none of them (``bench`` and ``serve`` import torch).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import click


class Lazy(NamedTuple):
    """A command imported when it runs: ``module:attribute`` and its line in the group's help."""

    path: str
    summary: str


def summary(command: click.Command) -> str:
    """A command's line in its group's help: its short help, else its help's first paragraph."""
    text = inspect.cleandoc(command.short_help or command.help or "")
    return text.split("\n\n")[0].replace("\n", " ")


class LazyGroup(click.Group):
    def __init__(self, *args: Any, lazy_subcommands: Mapping[str, Lazy] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        """In the order they were declared (click's own sorts them by name)."""
        return [*self.commands, *self.lazy_subcommands]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name: str) -> click.Command:
        module_name, attribute = self.lazy_subcommands[cmd_name].path.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, summary(command)) for name, command in self.commands.items() if not command.hidden]
        rows += [(name, lazy.summary) for name, lazy in self.lazy_subcommands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
