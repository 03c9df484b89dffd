"""A lesson as plain text, for screen readers and pipes (``quant-tutor read``): headings
underlined, tables as columns, code indented, links as their text, no Markdown syntax left."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from markdown_it.token import Token

from tutor.library.markdown import parse, readable_url
from tutor.library.models import Lesson

_APP_LINK = "quant-tutor:"
_CODE_INDENT = "    "


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


def markdown_as_plain(markdown: str) -> str:
    """A lesson body as plain text: headings underlined (= for # and ##, - below), tables as
    aligned columns, fenced code indented without its fences, inline marks removed;
    paragraphs and lists line for line as written. Blank lines, rules, indented code and
    headings inside lists or quotes print as written."""
    tokens, lines = parse(markdown.strip())
    out: list[str] = []
    printed = 0  # the source lines before this one are in ``out``
    index = 0
    while index < len(tokens):
        token = tokens[index]
        block, index = _block(tokens, index, lines)
        if block is not None:
            assert token.map is not None
            start, end = token.map
            out += lines[printed:start]  # what lies between the blocks, as written
            out += block
            printed = end
    out += lines[printed:]
    return "\n".join(out)


def _block(tokens: list[Token], index: int, lines: list[str]) -> tuple[list[str] | None, int]:
    """The plain lines of the block that starts at ``tokens[index]`` (None to print its source
    lines as they are), and the index of the token after the block."""
    token = tokens[index]
    if token.type == "paragraph_open":
        return _paragraph(tokens[index + 1], lines), index + 3
    if token.type == "heading_open" and token.level == 0:
        title = _inline(tokens[index + 1].children).replace("\n", " ")
        return _underlined(title, "=" if token.tag in ("h1", "h2") else "-"), index + 3
    if token.type == "fence":
        code = [f"{_CODE_INDENT}{line}".rstrip() for line in token.content.splitlines()]
        return _indented(code, token, lines), index + 1
    if token.type == "table_open":
        end = next(i for i in range(index, len(tokens)) if tokens[i].type == "table_close")
        return _indented(_table(tokens[index:end]), token, lines), end + 1
    return None, index + 1


def _indented(block: list[str], token: Token, lines: list[str]) -> list[str]:
    """``block`` as indented as the first source line of ``token`` (a table or code in a list item)."""
    assert token.map is not None
    first = lines[token.map[0]]
    indent = first[: len(first) - len(first.lstrip())]
    return [f"{indent}{line}" if line else line for line in block]


def _underlined(title: str, rule: str) -> list[str]:
    return [title, rule * len(title)]


def _paragraph(inline: Token, lines: list[str]) -> list[str]:
    """A paragraph line for line, each keeping what stands before its text in the source (its
    indent, a list item's marker, a quote's ``>``)."""
    assert inline.map is not None
    start = inline.map[0]
    out = []
    for offset, (text, content) in enumerate(
        zip(_inline(inline.children).split("\n"), inline.content.split("\n"), strict=False)
    ):
        source, content = lines[start + offset].rstrip(), content.strip()
        lead = source[: len(source) - len(content)] if source.endswith(content) else ""
        out.append(lead + text)
    return out


def _inline(tokens: Sequence[Token] | None) -> str:
    """Inline Markdown as words: emphasis and code marks dropped, a link as its text (and its
    address when it leads outside the app); a line break as a newline."""
    words: list[str] = []
    addresses: list[str] = []  # of the links open here; "" where the address is not printed
    for token in tokens or ():
        if token.type in ("text", "code_inline", "html_inline"):
            words.append(token.content)
        elif token.type in ("softbreak", "hardbreak"):
            words.append("\n")
        elif token.type == "link_open":
            href = str(token.attrs.get("href", ""))
            shown = token.markup == "autolink" or href.startswith(_APP_LINK)  # the text is the address
            addresses.append("" if shown else readable_url(href))
        elif token.type == "link_close" and addresses:
            href = addresses.pop()
            words.append(f" ({href})" if href else "")
        elif token.type == "image":
            src = str(token.attrs.get("src", ""))
            words.append(f"{_inline(token.children)} ({readable_url(src)})")
    return "".join(words)


def _table(tokens: Sequence[Token]) -> list[str]:
    """A table's rows as aligned columns, the header underlined."""
    rows: list[list[str]] = []
    for token, after in pairwise(tokens):
        if token.type == "tr_open":
            rows.append([])
        elif token.type in ("th_open", "td_open"):
            rows[-1].append(_inline(after.children).strip())
    widths = [max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(max(map(len, rows)))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    if len(lines) > 1:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return lines
