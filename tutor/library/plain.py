"""A lesson as plain text, for screen readers and pipes (``quant-tutor read``): headings
underlined, tables as columns, links as their text, no Markdown syntax left."""

from __future__ import annotations

import re

from tutor.library.models import Lesson


def plain_text(lesson: Lesson) -> str:
    """The lesson as plain text for screen readers and pipes: no Markdown syntax left."""
    meta = lesson.meta
    out = [*_underlined(meta.title, "="), f"{meta.track} · about {meta.minutes} min read", ""]
    out += [*_underlined("The premise", "-"), meta.premise, ""]
    out += [markdown_as_plain(lesson.body), "", *_underlined("Key terms", "-")]
    out += [f"- {t.term}: {t.definition}" for t in meta.key_terms]
    out += ["", *_underlined("Practice", "-")]
    out += [f"{i}. {step.title}: {step.prompt}" for i, step in enumerate(meta.practice, 1)]
    return "\n".join(out) + "\n"


_ANY_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")  # sections are ## and ### only: _HEADING
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)(.+?)\1")
_APP_LINK = "quant-tutor:"


def _underlined(title: str, rule: str) -> list[str]:
    return [title, rule * len(title)]


def _inline(text: str) -> str:
    """Inline Markdown as words: emphasis and code marks dropped, a link as its text (and its
    address when it leads outside the app)."""

    def link(match: re.Match[str]) -> str:
        label, href = match.groups()
        return label if href.startswith(_APP_LINK) else f"{label} ({href})"

    return _EMPHASIS.sub(r"\2", _LINK.sub(link, text))


def _cells(row: str) -> list[str]:
    return [_inline(cell.strip()) for cell in row.strip().strip("|").split("|")]


def _table(rows: list[str]) -> list[str]:
    """Pipe-table rows as aligned columns, the header underlined."""
    cells = [_cells(row) for row in rows if not _TABLE_RULE.match(row.strip())]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in cells) for i in range(max(map(len, cells)))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    if len(lines) > 1:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def markdown_as_plain(markdown: str) -> str:
    """A lesson body as plain text: headings underlined (= for ##, - below), pipe tables as
    aligned columns, inline marks removed; paragraphs and lists as written."""
    out: list[str] = []
    table: list[str] = []
    for line in markdown.strip().splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        if table:
            out += _table(table)
            table = []
        heading = _ANY_HEADING.match(line)
        if heading:
            marks, title = heading.groups()
            out += _underlined(_inline(title), "=" if len(marks) <= 2 else "-")
        else:
            out.append(_inline(line))
    if table:
        out += _table(table)
    return "\n".join(out)
