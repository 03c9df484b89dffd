"""Lesson Markdown as markdown-it-py reads it: CommonMark with GFM's tables and strikethrough,
the blocks the lesson tab shows (its ``gfm-like`` parser only adds links made of bare URLs).
One parse gives the block tokens, each with the ``map`` of source lines it covers, and the
source lines they count; :mod:`tutor.library.content` splits a lesson into sections with it,
:mod:`tutor.library.plain` prints one as plain text."""

from __future__ import annotations

import re
from functools import cache

from markdown_it import MarkdownIt
from markdown_it.token import Token

# How markdown-it splits its source into the lines its ``map`` ranges count (str.splitlines
# would also split at form feeds and Unicode line separators, which markdown-it keeps in a line).
_NEWLINE = re.compile(r"\r\n?|\n")


@cache
def _parser(inline: bool) -> MarkdownIt:
    parser = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    return parser if inline else parser.disable("inline")


def parse(markdown: str, *, inline: bool = True) -> tuple[list[Token], list[str]]:
    """The block tokens of ``markdown`` and its source lines, numbered as the tokens' ``map`` counts.

    Without ``inline``, an inline token has its source (``content``) but no ``children``: the
    blocks alone, in less than half the time.
    """
    return _parser(inline).parse(markdown), _NEWLINE.split(markdown)


def readable_url(href: str) -> str:
    """A link's address as a person would write it (markdown-it stores it percent-encoded)."""
    return _parser(True).normalizeLinkText(href)
