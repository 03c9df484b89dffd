"""A lesson cut into passages: one chunk per paragraph of a section (a list or a table stays
whole; a very short paragraph joins the next one), and the front matter's parts as sections of
their own. Each chunk has a stable anchor, ``<lesson id>#<section slug>/<paragraph index>``,
that only changes when the lesson's own text does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tutor.library.content import Library
from tutor.library.models import Lesson, Section
from tutor.text import slug, unlink

# Paragraphs shorter than this many words join the next paragraph of their section.
MIN_CHUNK_WORDS = 12


@dataclass(frozen=True)
class Chunk:
    lesson_id: str
    lesson_title: str
    section: str  # the exact heading
    paragraph: int  # index of the chunk's first paragraph within its section
    text: str  # the paragraph(s) as written in lesson.md
    parent: str = ""  # the enclosing ## heading of a ### section

    @property
    def anchor(self) -> str:
        return f"{self.lesson_id}#{slug(self.section)}/{self.paragraph}"

    def embed_text(self) -> str:
        """What gets embedded and BM25-indexed: the headings give a bare paragraph its topic."""
        heading = f"{self.parent}: {self.section}" if self.parent else self.section
        return f"{heading}. {plain_markdown(self.text)}"


def plain_markdown(text: str) -> str:
    """Markdown without links, table rules, pipes, emphasis and backticks (for embedding)."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"\|?[\s:|-]+\|?", stripped) and "-" in stripped:
            continue  # a table's |---|---| rule
        if stripped.startswith("|"):
            stripped = "; ".join(c.strip() for c in stripped.strip("|").split("|")) + "."
        lines.append(stripped)
    return _EMPHASIS.sub("", unlink(" ".join(lines))).strip()


# Emphasis and code marks; an underscore only at a word's edge, so "Q4_K_M" and "IQ4_XS" keep theirs.
_EMPHASIS = re.compile(r"[`*]{1,3}(?=\S)|(?<=\S)[`*]{1,3}|(?<!\w)_{1,3}(?=\S)|(?<=\S)_{1,3}(?!\w)")


def _paragraphs(body: str) -> list[str]:
    """Blank-line separated blocks, keeping a fenced code block whole."""
    blocks: list[list[str]] = [[]]
    in_fence = False
    for line in body.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if blocks[-1]:
                blocks.append([])
            continue
        blocks[-1].append(line)
    return ["\n".join(b).strip() for b in blocks if b and "\n".join(b).strip()]


def section_chunks(lesson_id: str, lesson_title: str, section: Section, parent: str = "") -> list[Chunk]:
    paragraphs = _paragraphs(section.body)
    chunks: list[Chunk] = []
    pending: list[str] = []
    start = 0
    for index, paragraph in enumerate(paragraphs):
        if not pending:
            start = index
        pending.append(paragraph)
        joined = "\n\n".join(pending)
        is_code = paragraph.lstrip().startswith("```")
        if (len(joined.split()) >= MIN_CHUNK_WORDS and not _ends_with_colon(paragraph)) or is_code:
            chunks.append(Chunk(lesson_id, lesson_title, section.heading, start, joined, parent))
            pending = []
    if pending:
        if chunks and len("\n\n".join(pending).split()) < MIN_CHUNK_WORDS:
            last = chunks[-1]
            chunks[-1] = Chunk(
                lesson_id, lesson_title, section.heading, last.paragraph,
                last.text + "\n\n" + "\n\n".join(pending), parent,
            )  # fmt: skip
        else:
            chunks.append(
                Chunk(lesson_id, lesson_title, section.heading, start, "\n\n".join(pending), parent)
            )
    return chunks


def _ends_with_colon(paragraph: str) -> bool:
    """A paragraph that introduces a code block or list belongs with what follows."""
    return paragraph.rstrip().endswith(":")


# The front matter's parts, indexed as sections of their own: a learner asks "what's the
# premise?" or "define calibration" as often as about the body.
PREMISE, SUMMARY, KEY_TERMS, PRACTICE = "Premise", "Summary", "Key terms", "Practice"
FRONT_MATTER = (PREMISE, SUMMARY, KEY_TERMS, PRACTICE)


def front_matter_chunks(lesson: Lesson) -> list[Chunk]:
    """The premise and the summary as one chunk each; every key term and practice step as its own."""
    meta = lesson.meta

    def chunk(section: str, index: int, text: str) -> Chunk:
        return Chunk(lesson.id, lesson.title, section, index, text)

    return [
        chunk(PREMISE, 0, meta.premise),
        chunk(SUMMARY, 0, meta.summary),
        *(chunk(KEY_TERMS, i, f"**{t.term}**: {t.definition}") for i, t in enumerate(meta.key_terms)),
        *(
            chunk(PRACTICE, i - 1, f"**Step {i}, {s.title}**: {s.prompt}")
            for i, s in enumerate(meta.practice, 1)
        ),
    ]


def lesson_chunks(lesson: Lesson) -> list[Chunk]:
    """The lesson's passages in order: its front matter's parts, then each section's paragraphs."""
    chunks = front_matter_chunks(lesson)
    parent = ""
    for section in lesson.sections:
        if section.level == 2:
            parent = section.heading
        chunks.extend(section_chunks(lesson.id, lesson.title, section, parent if section.level > 2 else ""))
    return chunks


def lesson_and_related(library: Library, lesson_id: str | None) -> list[str]:
    """The lessons a question about ``lesson_id`` searches first: it and its related ones
    (the catalogue's first lesson stands in for an unknown one)."""
    entry = library.lessons.get(lesson_id or "") or next(iter(library.lessons.values()), None)
    if entry is None:
        return []
    return [entry.id, *(r for r in entry.related if r in library.lessons and r != entry.id)]
