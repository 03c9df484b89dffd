"""The one text toolkit, below everything: text made safe to show, counts and times in words,
and the tokens, stems and sentences that retrieval, the quote and the support check share.

Text from the model, content files or the learner is made safe to show in a terminal by
``clean``: control characters and escape sequences are removed (newlines and tabs stay), so
nothing a string carries can move the cursor, change colours or set a title. Rendering it
literally (never as Rich/Textual markup) is the widget's job.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

# CSI / OSC / other ESC sequences first, then any remaining C0/C1 control character.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (keeps \\n and \\t)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n")))


def when(timestamp: str, now: datetime | None = None) -> str:
    """An ISO timestamp (stored in UTC) as the learner says it, in local time: "today at 09:54",
    "yesterday at 17:02", "on 26 Nov at 10:00", "on 3 Jan 2025 at 08:15"."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    local = moment.astimezone()
    today = (now or datetime.now().astimezone()).astimezone(local.tzinfo).date()
    clock = local.strftime("%H:%M")
    if local.date() == today:
        return f"today at {clock}"
    if (today - local.date()).days == 1:
        return f"yesterday at {clock}"
    day = f"{local.day} {local.strftime('%b')}"
    return f"on {day} at {clock}" if local.year == today.year else f"on {day} {local.year} at {clock}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """The count with the word in the right number: "1 attempt", "0 attempts", "2 wrong answers"."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


# --- tokens and stems ---------------------------------------------------------------


def word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words with digits, dots and underscores inside stay whole: int8, q4_k_m, 7b, 3.5, llm.int8
_TOKEN = re.compile(r"[a-z0-9]+(?:[._][a-z0-9]+)*")
STOPWORDS = word_set(
    """
    a an and are as at be been but by can could did do does doing for from had has have how i if
    in into is it its it's me my of on or our so than that the their them then there these they
    this to too was we were what when where which while who why will with would you your yours
    about am any just should shall may might must much many more most very also not no
    """
)


# "4-bit", "4 bits", "int4" and "4bit" all also yield the token "4bit"; fp16/bf16 yield "16bit".
_BIT_WIDTH = re.compile(r"\b(\d{1,2})[- ]?bits?\b|\b(?:int|fp|bf|nf|q)(\d{1,2})(?![\d.])")
_ALIASES = {"chatbot": "chat", "chatbots": "chat", "imatrix": "importance", "ram": "memory", "vram": "memory"}


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens; ``q4_k_m`` and ``llm.int8`` also yield their parts (q4, llm, int8),
    and bit widths however written yield one shared token ("4-bit" and "int4": "4bit")."""
    text = text.lower()
    out: list[str] = []
    for token in _TOKEN.findall(text):
        out.append(token)
        if "_" in token or "." in token:
            parts = [p for p in re.split(r"[._]", token) if len(p) >= 2 and not p.isdigit()]
            out.extend(parts)
        if token in _ALIASES:
            out.append(_ALIASES[token])
    out.extend(f"{m.group(1) or m.group(2)}bit" for m in _BIT_WIDTH.finditer(text))
    return out


def stem(token: str) -> str:
    """A light suffix stripper so "saving", "saves" and "save" meet; tokens with digits stay."""
    if not token.isalpha() or len(token) <= 3:
        return token
    for suffix in ("ing", "ed", "es", "s"):
        if token.endswith(suffix) and len(token) - len(suffix) >= 3:
            token = token[: -len(suffix)]
            break
    if token.endswith("e") and len(token) > 3:
        token = token[:-1]
    return token


def content_tokens(text: str) -> list[str]:
    """:func:`tokenize` without stop words, stemmed (for BM25 and for token overlap)."""
    return [stem(t) for t in tokenize(text) if t not in STOPWORDS]


def slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"


# --- sentences ----------------------------------------------------------------------

_ABBREVIATIONS = word_set(
    """
    e.g i.e etc vs al approx cf fig eq dr mr mrs ms prof st inc ltd jr sr ca resp incl esp
    """
)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
_TABLE_RULE = re.compile(r"^\|?[\s:|-]*-[\s:|-]*\|?$")
_EMPHASIS = re.compile(r"\*\*|__")


def _split_prose(text: str) -> list[str]:
    pieces: list[str] = []
    position = 0
    for match in _BOUNDARY.finditer(text):
        pieces.append(text[position : match.end()].strip())
        position = match.end()
    pieces.append(text[position:].strip())
    merged: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if merged and _ends_mid_sentence(merged[-1]):
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return merged


def _ends_mid_sentence(piece: str) -> bool:
    """True when the final period belongs to an abbreviation ("e.g.", "et al.") or an initial."""
    if not piece.endswith("."):
        return False
    last = piece.split()[-1].rstrip(".").lstrip("(\"'“‘").lower()
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())


def _table_rows(lines: list[str]) -> list[str]:
    """A Markdown table as one line per row: "Header: cell; Header: cell"."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = [r for r, line in zip(rows, lines, strict=True) if not _TABLE_RULE.match(line.strip())]
    if len(rows) < 2:
        return ["; ".join(r) for r in rows]
    header, body = rows[0], rows[1:]
    return ["; ".join(f"{h}: {c}" if h else c for h, c in zip(header, row, strict=False)) for row in body]


def sentences(text: str) -> list[str]:
    """Split prose (a lesson passage or a model's answer) into sentences.

    Keeps "e.g.", "et al.", decimals such as 3.5 and names such as LLM.int8() whole;
    ends a sentence after "int8." when a new one follows; gives every list item and
    table row its own entry; drops fenced code, headings' ``#`` marks, bold markers and
    link targets (a link keeps its text).
    """
    out: list[str] = []
    blocks: list[tuple[str, list[str]]] = []  # ("prose" | "table", lines)
    in_fence = False
    for raw in clean(text).splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_fence = not in_fence
            blocks.append(("break", []))
            continue
        if in_fence:
            continue
        if not line:
            blocks.append(("break", []))
        elif line.startswith("|"):
            if blocks and blocks[-1][0] == "table":
                blocks[-1][1].append(line)
            else:
                blocks.append(("table", [line]))
        elif line.startswith("#"):
            blocks.append(("prose", [line.lstrip("#").strip()]))
            blocks.append(("break", []))
        elif _BULLET.match(line) or not blocks or blocks[-1][0] != "prose":
            blocks.append(("prose", [_BULLET.sub("", line)]))
        else:
            blocks[-1][1].append(line)
    for kind, lines in blocks:
        if kind == "table":
            out.extend(_table_rows(lines))
        elif kind == "prose":
            out.extend(_split_prose(_EMPHASIS.sub("", unlink(" ".join(lines)))))
    return [s for s in (" ".join(s.split()) for s in out) if any(ch.isalnum() for ch in s)]


_LINK = re.compile(r"\[([^\]]+)\]\([^)\s]*\)")


def unlink(text: str) -> str:
    """Markdown links reduced to their text: "[open the lab](quant-tutor:lab)" -> "open the lab"."""
    return _LINK.sub(r"\1", text)
