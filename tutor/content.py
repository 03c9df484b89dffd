"""Lessons and quizzes as data files: loading, validation and the JSON Schema.

A lesson lives in ``content/<lesson-id>/``: ``lesson.md`` (YAML front matter plus a
Markdown body whose ``##`` headings are the lesson's sections) and ``quiz.yaml``
(exactly ten questions). A broken file never stops the other lessons from loading:
:func:`load_library` returns the good lessons and a list of :class:`ContentError`,
each naming the file, the field and the line.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LETTERS = "abcd"
QUIZ_LENGTH = 10
_ID_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
_HEADING = re.compile(r"^(#{2,3})\s+(.+?)\s*#*\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class KeyTerm(_Strict):
    term: str = Field(min_length=1, description="The term as the lesson uses it.")
    definition: str = Field(min_length=1, description="One line, in plain words.")

    @field_validator("definition")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value:
            raise ValueError("a key-term definition must fit on one line")
        return value


class PracticeStep(_Strict):
    title: str = Field(min_length=1, description="Short name of the step.")
    prompt: str = Field(min_length=1, description="What the learner is asked to do.")
    tutor_question: str | None = Field(
        default=None, description="Question to prefill when the step opens the tutor."
    )


class LessonMeta(_Strict):
    id: str = Field(pattern=_ID_PATTERN, description="Folder name; stable across releases.")
    title: str = Field(min_length=1)
    track: str = Field(min_length=1, description="Track and family, e.g. 'Creators · Model Families'.")
    minutes: int = Field(ge=1, le=240, description="Estimated reading time.")
    summary: str = Field(min_length=1, description="One or two sentences for lesson lists.")
    premise: str = Field(min_length=1)
    key_terms: list[KeyTerm] = Field(min_length=1)
    practice: list[PracticeStep] = Field(min_length=1, max_length=6)
    related: list[str] = Field(default_factory=list)

    @field_validator("related")
    @classmethod
    def _related_ids(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.match(_ID_PATTERN, item):
                raise ValueError(f"{item!r} is not a lesson id (lowercase words joined by '-')")
        return value


class Choice(_Strict):
    text: str = Field(min_length=1)
    feedback: str = Field(min_length=1, description="Shown after the learner picks this choice.")


class Question(_Strict):
    id: str = Field(pattern=_ID_PATTERN)
    stem: str = Field(min_length=1)
    choices: list[Choice] = Field(min_length=3, max_length=4)
    answer: Literal["a", "b", "c", "d"] = Field(description="Letter of the correct choice.")
    explanation: str = Field(min_length=1)
    source: str = Field(min_length=1, description="Heading of the lesson section that teaches it.")

    @model_validator(mode="after")
    def _answer_in_range(self) -> Question:
        if LETTERS.index(self.answer) >= len(self.choices):
            raise ValueError(
                f"answer {self.answer!r} points past the last choice ({LETTERS[len(self.choices) - 1]!r})"
            )
        return self

    @property
    def correct_index(self) -> int:
        return LETTERS.index(self.answer)


class QuizFile(_Strict):
    questions: list[Question] = Field(min_length=QUIZ_LENGTH, max_length=QUIZ_LENGTH)

    @field_validator("questions")
    @classmethod
    def _unique_ids(cls, value: list[Question]) -> list[Question]:
        seen: set[str] = set()
        for question in value:
            if question.id in seen:
                raise ValueError(f"question id {question.id!r} is used twice")
            seen.add(question.id)
        return value


@dataclass(frozen=True)
class Section:
    heading: str
    level: int
    line: int  # 1-based line in lesson.md
    body: str


@dataclass(frozen=True)
class Lesson:
    meta: LessonMeta
    body: str
    sections: tuple[Section, ...]
    questions: tuple[Question, ...]
    folder: Path

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def title(self) -> str:
        return self.meta.title

    def section(self, heading: str) -> Section | None:
        wanted = heading.casefold()
        return next((s for s in self.sections if s.heading.casefold() == wanted), None)


@dataclass(frozen=True)
class ContentError:
    file: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass
class Library:
    lessons: dict[str, Lesson] = field(default_factory=dict)
    errors: list[ContentError] = field(default_factory=list)
    root: Path | None = None  # the folder it was read from (the engine process reads it again)

    def ordered(self) -> list[Lesson]:
        return list(self.lessons.values())

    def get(self, lesson_id: str) -> Lesson:
        try:
            return self.lessons[lesson_id]
        except KeyError:
            known = ", ".join(self.lessons) or "none"
            raise KeyError(f"no lesson {lesson_id!r}; known lessons: {known}") from None


class ContentFileError(Exception):
    def __init__(self, errors: Sequence[ContentError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = list(errors)


def default_content_dir() -> Path:
    """The shipped lessons: ``content/`` in a checkout, ``tutor/lessons`` in an installed wheel."""
    return Path(str(importlib.resources.files("tutor.lessons")))


# --- YAML with line numbers ------------------------------------------------------


def _node_line(node: yaml.Node, path: Iterable[str | int]) -> int | None:
    """1-based line of the YAML node at ``path`` (the deepest one that exists)."""
    line = node.start_mark.line + 1
    for key in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def _parse_yaml(text: str, file: Path, line_offset: int) -> tuple[Any, yaml.Node | None]:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 + line_offset if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ContentFileError([ContentError(file, line, "", f"not valid YAML: {problem}")]) from None
    return data, node


def _validate(model: type[BaseModel], data: Any, node: yaml.Node | None, file: Path, line_offset: int) -> Any:
    if not isinstance(data, dict):
        raise ContentFileError([ContentError(file, 1 + line_offset, "", "expected a YAML mapping of fields")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if isinstance(p, (str, int))]
            line = _node_line(node, loc) if node is not None else None
            errors.append(
                ContentError(
                    file,
                    line + line_offset if line else None,
                    ".".join(str(p) for p in loc),
                    err["msg"],
                )
            )
        raise ContentFileError(errors) from None


# --- lesson.md and quiz.yaml -------------------------------------------------------


def split_front_matter(text: str, file: Path) -> tuple[str, str, int]:
    """Return (front matter YAML, Markdown body, 1-based line where the body starts)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise ContentFileError([ContentError(file, 1, "", "lesson.md must start with '---' front matter")])
    for index in range(1, len(lines)):
        if lines[index].strip() == "---":
            return "".join(lines[1:index]), "".join(lines[index + 1 :]), index + 2
    raise ContentFileError([ContentError(file, 1, "", "front matter is not closed by a '---' line")])


def parse_sections(body: str, first_line: int) -> tuple[Section, ...]:
    """Split the Markdown body at ``##``/``###`` headings, outside fenced code."""
    found: list[tuple[str, int, int, list[str]]] = []
    in_fence = False
    for offset, raw in enumerate(body.splitlines()):
        if raw.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(raw)
        if match:
            found.append((match.group(2).strip(), len(match.group(1)), first_line + offset, []))
        elif found:
            found[-1][3].append(raw)
    return tuple(Section(h, level, line, "\n".join(text).strip()) for h, level, line, text in found)


def load_lesson(folder: Path) -> Lesson:
    lesson_file = folder / "lesson.md"
    quiz_file = folder / "quiz.yaml"
    errors: list[ContentError] = []
    try:
        text = lesson_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContentFileError([ContentError(lesson_file, None, "", f"cannot read: {exc}")]) from None
    front, body, body_line = split_front_matter(text, lesson_file)
    data, node = _parse_yaml(front, lesson_file, 1)
    meta: LessonMeta = _validate(LessonMeta, data, node, lesson_file, 1)
    if meta.id != folder.name:
        id_line = _node_line(node, ["id"]) if node is not None else None
        errors.append(
            ContentError(
                lesson_file,
                id_line + 1 if id_line else None,
                "id",
                f"id {meta.id!r} must match the folder name {folder.name!r}",
            )
        )
    sections = parse_sections(body, body_line)
    if not sections:
        errors.append(ContentError(lesson_file, body_line, "body", "the lesson has no '## ' sections"))

    try:
        quiz_text = quiz_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContentFileError([*errors, ContentError(quiz_file, None, "", f"cannot read: {exc}")]) from None
    quiz_data, quiz_node = _parse_yaml(quiz_text, quiz_file, 0)
    quiz: QuizFile = _validate(QuizFile, quiz_data, quiz_node, quiz_file, 0)
    headings = {s.heading.casefold() for s in sections}
    for index, question in enumerate(quiz.questions):
        if question.source.casefold() not in headings:
            errors.append(
                ContentError(
                    quiz_file,
                    _node_line(quiz_node, ["questions", index, "source"]) if quiz_node else None,
                    f"questions.{index}.source",
                    f"{question.source!r} is not a section heading of {lesson_file.name}",
                )
            )
    if errors:
        raise ContentFileError(errors)
    return Lesson(meta, body, sections, tuple(quiz.questions), folder)


def load_library(root: Path | None = None) -> Library:
    """Every lesson under ``root``; broken ones are reported, never fatal."""
    root = root or default_content_dir()
    library = Library(root=root)
    if not root.is_dir():
        library.errors.append(ContentError(root, None, "", "content folder not found"))
        return library
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "lesson.md").exists()):
        try:
            lesson = load_lesson(folder)
        except ContentFileError as exc:
            library.errors.extend(exc.errors)
            continue
        library.lessons[lesson.id] = lesson
    # Shortest first: the 7-minute seed lesson opens, its longer follow-ups come after.
    ordered = sorted(library.lessons.values(), key=lambda lesson: (lesson.meta.minutes, lesson.id))
    library.lessons = {lesson.id: lesson for lesson in ordered}
    for lesson in library.lessons.values():
        for related in lesson.meta.related:
            if related not in library.lessons and not any(
                e.file.parent.name == related for e in library.errors
            ):
                library.errors.append(
                    ContentError(lesson.folder / "lesson.md", None, "related", f"no lesson {related!r}")
                )
    return library


def json_schema() -> dict[str, Any]:
    return {
        "lesson.md front matter": LessonMeta.model_json_schema(),
        "quiz.yaml": QuizFile.model_json_schema(),
    }


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


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
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
        heading = _HEADING.match(line)
        if heading:
            marks, title = heading.groups()
            out += _underlined(_inline(title), "=" if len(marks) <= 2 else "-")
        else:
            out.append(_inline(line))
    if table:
        out += _table(table)
    return "\n".join(out)
