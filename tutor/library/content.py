"""Lessons and quizzes as data files: loading, validation and the JSON Schema.

A lesson lives in ``content/<lesson-id>/``: ``lesson.md`` (YAML front matter plus a
Markdown body whose ``##`` and ``###`` headings are the lesson's sections) and ``quiz.yaml``
(exactly ten questions). A broken file never stops the other lessons from loading:
:func:`load_library` returns the good lessons and a list of :class:`ContentError`,
each naming the file, the field and the line. What the data is lives in
:mod:`tutor.library.models`; a lesson as plain text in :mod:`tutor.library.plain`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tutor.files import write_atomic
from tutor.library.markdown import parse
from tutor.library.models import (
    ContentError,
    ContentFileError,
    Lesson,
    LessonEntry,
    LessonMeta,
    Question,
    QuizFile,
    Section,
    Strict,
)


@dataclass
class Library:
    """The lessons under one folder.

    ``lessons`` is the catalogue (front matter only, in display order) and is all that start-up
    reads; a lesson's body and quiz are parsed when :meth:`get` first asks for it.
    """

    lessons: dict[str, LessonEntry] = field(default_factory=dict)
    errors: list[ContentError] = field(default_factory=list)
    root: Path | None = None  # the folder it was read from (the engine process reads it again)
    _opened: dict[str, Lesson] = field(default_factory=dict, repr=False)

    def get(self, lesson_id: str) -> Lesson:
        """The whole lesson, parsed on first use; a broken one raises :class:`ContentFileError`
        (and its errors join :attr:`errors`)."""
        if lesson_id not in self.lessons:
            known = ", ".join(self.lessons) or "none"
            raise KeyError(f"no lesson {lesson_id!r}; known lessons: {known}")
        lesson = self._opened.get(lesson_id)
        if lesson is None:
            assert self.root is not None, "a library with lessons was read from a folder"
            try:
                lesson = load_lesson(self.root / lesson_id)
            except ContentFileError as exc:
                self.errors.extend(e for e in exc.errors if e not in self.errors)
                raise
            self._opened[lesson_id] = lesson
        return lesson

    def ordered(self) -> list[Lesson]:
        """Every lesson, whole, in catalogue order (parsing all of them); broken ones are left out."""
        lessons = []
        for lesson_id in self.lessons:
            try:
                lessons.append(self.get(lesson_id))
            except ContentFileError:
                continue
        return lessons


def default_content_dir() -> Path:
    """The shipped lessons: ``content/`` in a checkout, ``tutor/lessons`` in an installed wheel."""
    return Path(str(importlib.resources.files("tutor.lessons")))


# --- YAML, with line numbers only for a file that failed ---------------------------

# libyaml's loader is many times faster than PyYAML's pure-Python one where it is built in.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _node_line(node: yaml.Node | None, path: Iterable[str | int]) -> int | None:
    """1-based line of the YAML node at ``path`` (the deepest one that exists)."""
    if node is None:
        return None
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


def _line_in(text: str, path: Iterable[str | int], line_offset: int) -> int | None:
    """The file line of the field at ``path``: a second, node-building pass over text that
    already parsed, so only a file with an error pays for it."""
    line = _node_line(yaml.compose(text, Loader=_LOADER), path)
    return line + line_offset if line else None


def _parse_yaml(text: str, file: Path, line_offset: int) -> Any:
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 + line_offset if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ContentFileError([ContentError(file, line, "", f"not valid YAML: {problem}")]) from None


def _validate(model: type[BaseModel], data: Any, text: str, file: Path, line_offset: int) -> Any:
    if not isinstance(data, dict):
        raise ContentFileError([ContentError(file, 1 + line_offset, "", "expected a YAML mapping of fields")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if isinstance(p, (str, int))]
            field_name = ".".join(str(p) for p in loc)
            errors.append(ContentError(file, _line_in(text, loc, line_offset), field_name, err["msg"]))
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
    """Split the Markdown body at its ``##`` and ``###`` headings: the level-2 and level-3
    headings of the body itself, as markdown-it reads it (a ``#`` line in a code block, a quote
    or a list is not one). A section's text is its source, up to the next section's heading."""
    tokens, lines = parse(body, inline=False)  # a title's source is all a section needs
    found = [
        (token.map, int(token.tag[1]), tokens[index + 1].content)  # the inline token after is the title
        for index, token in enumerate(tokens)
        if token.type == "heading_open" and token.level == 0 and token.tag in ("h2", "h3") and token.map
    ]
    sections = []
    for number, ((start, end), level, title) in enumerate(found):
        stop = found[number + 1][0][0] if number + 1 < len(found) else len(lines)
        sections.append(Section(title, level, first_line + start, "\n".join(lines[end:stop]).strip()))
    return tuple(sections)


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContentFileError([ContentError(file, None, "", f"cannot read: {exc}")]) from None


def read_front_matter(folder: Path) -> tuple[LessonMeta, str, int]:
    """The validated front matter of ``folder/lesson.md``, its (unparsed) body and the body's line."""
    lesson_file = folder / "lesson.md"
    front, body, body_line = split_front_matter(_read(lesson_file), lesson_file)
    meta: LessonMeta = _validate(LessonMeta, _parse_yaml(front, lesson_file, 1), front, lesson_file, 1)
    if meta.id != folder.name:
        message = f"id {meta.id!r} must match the folder name {folder.name!r}"
        raise ContentFileError([ContentError(lesson_file, _line_in(front, ["id"], 1), "id", message)])
    return meta, body, body_line


def _read_quiz(quiz_file: Path, headings: set[str], lesson_name: str) -> tuple[Question, ...]:
    """The quiz, every question's ``source`` checked against the lesson's headings (casefolded)."""
    text = _read(quiz_file)
    quiz: QuizFile = _validate(QuizFile, _parse_yaml(text, quiz_file, 0), text, quiz_file, 0)
    errors = [
        ContentError(
            quiz_file,
            _line_in(text, ["questions", index, "source"], 0),
            f"questions.{index}.source",
            f"{question.source!r} is not a section heading of {lesson_name}",
        )
        for index, question in enumerate(quiz.questions)
        if question.source.casefold() not in headings
    ]
    if errors:
        raise ContentFileError(errors)
    return tuple(quiz.questions)


def load_lesson(folder: Path) -> Lesson:
    """The whole lesson: front matter, sections and quiz, each checked."""
    meta, body, body_line = read_front_matter(folder)
    sections = parse_sections(body, body_line)
    errors: list[ContentError] = []
    if not sections:
        errors.append(
            ContentError(folder / "lesson.md", body_line, "body", "the lesson has no '## ' sections")
        )
    try:
        questions = _read_quiz(folder / "quiz.yaml", {s.heading.casefold() for s in sections}, "lesson.md")
    except ContentFileError as exc:
        errors += exc.errors
    if errors:
        raise ContentFileError(errors)
    return Lesson(meta, body, sections, questions, folder)


# --- the library index: the catalogue, cached per content folder --------------------

INDEX_FORMAT = 1  # bump when LessonEntry or what the index checks changes


class _IndexedError(Strict):
    file: str
    line: int | None
    field: str
    message: str


class _IndexedFolder(Strict):
    """One lesson folder as the index last saw it: its lesson.md's (mtime_ns, size) then, and
    either the catalogue entry or what was wrong with the front matter."""

    stamp: tuple[int, int]
    entry: LessonEntry | None = None
    errors: tuple[_IndexedError, ...] = ()


class _LibraryIndex(Strict):
    format: int
    version: str
    root: str
    folders: dict[str, _IndexedFolder]


def index_path(root: Path) -> Path:
    """Where the index of ``root`` is cached: one file per content folder in the user cache dir."""
    from tutor.paths import cache_dir

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
    return cache_dir() / "library" / f"{key}.json"


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Every lesson folder's name and its lesson.md's (mtime_ns, size): one stat per lesson."""
    stamps = {}
    with os.scandir(root) as found:
        for item in found:
            if not item.is_dir():
                continue
            try:
                stat = os.stat(os.path.join(item.path, "lesson.md"))
            except OSError:
                continue  # not a lesson folder
            stamps[item.name] = (stat.st_mtime_ns, stat.st_size)
    return stamps


def _index_folder(folder: Path, stamp: tuple[int, int]) -> _IndexedFolder:
    try:
        meta, _body, _line = read_front_matter(folder)
    except ContentFileError as exc:
        errors = tuple(
            _IndexedError(file=str(e.file), line=e.line, field=e.field, message=e.message) for e in exc.errors
        )
        return _IndexedFolder(stamp=stamp, errors=errors)
    return _IndexedFolder(stamp=stamp, entry=LessonEntry.of(meta))


def _read_index(path: Path, root: Path) -> dict[str, _IndexedFolder]:
    """The cached folders, or nothing when the file is missing, unreadable, corrupt or stale:
    the index is a cache, rebuilt rather than trusted."""
    from tutor import __version__

    try:
        index = _LibraryIndex.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return {}
    if index.format != INDEX_FORMAT or index.version != __version__ or index.root != str(root.resolve()):
        return {}
    return index.folders


def _write_index(path: Path, root: Path, folders: dict[str, _IndexedFolder]) -> None:
    from tutor import __version__

    index = _LibraryIndex(format=INDEX_FORMAT, version=__version__, root=str(root.resolve()), folders=folders)
    data = index.model_dump_json().encode()
    with contextlib.suppress(OSError):  # an index that cannot be written costs the next start a rebuild
        write_atomic(path, lambda handle: handle.write(data))


def _refreshed(root: Path, path: Path) -> dict[str, _IndexedFolder]:
    """The index of ``root``, re-reading only the lesson.md files whose stamp changed."""
    cached = _read_index(path, root)
    folders = {}
    for name, stamp in sorted(_stamps(root).items()):
        hit = cached.get(name)
        folders[name] = hit if hit is not None and hit.stamp == stamp else _index_folder(root / name, stamp)
    if folders != cached:
        _write_index(path, root, folders)
    return folders


def _missing_related(
    entries: dict[str, LessonEntry], errors: list[ContentError], root: Path
) -> list[ContentError]:
    """A related id that names no lesson, unless that lesson is there but broken (already reported)."""
    broken = {e.file.parent.name for e in errors}
    return [
        ContentError(root / entry.id / "lesson.md", None, "related", f"no lesson {related!r}")
        for entry in entries.values()
        for related in entry.related
        if related not in entries and related not in broken
    ]


def _library(root: Path, entries: Iterable[LessonEntry], errors: list[ContentError]) -> Library:
    # Shortest first: the 7-minute seed lesson opens, its longer follow-ups come after.
    ordered = {e.id: e for e in sorted(entries, key=lambda e: (e.minutes, e.id))}
    return Library(lessons=ordered, errors=errors + _missing_related(ordered, errors, root), root=root)


def load_library(root: Path | None = None, index: Path | None = None) -> Library:
    """The catalogue of every lesson under ``root`` from its cached index (``index``, by default
    in the user cache dir), refreshed for the folders that changed. Front-matter problems are
    reported, never fatal; bodies and quizzes are checked when a lesson is opened."""
    root = root or default_content_dir()
    if not root.is_dir():
        return Library(errors=[ContentError(root, None, "", "content folder not found")], root=root)
    folders = _refreshed(root, index or index_path(root))
    errors = [
        ContentError(Path(e.file), e.line, e.field, e.message) for f in folders.values() for e in f.errors
    ]
    return _library(root, (f.entry for f in folders.values() if f.entry is not None), errors)


def validate_library(root: Path | None = None) -> Library:
    """Every lesson under ``root`` parsed and checked whole (front matter, body, quiz, related
    ids), without the index: what ``quant-tutor validate`` runs for authors and CI."""
    root = root or default_content_dir()
    if not root.is_dir():
        return Library(errors=[ContentError(root, None, "", "content folder not found")], root=root)
    lessons, errors = [], []
    for name in sorted(_stamps(root)):
        try:
            lessons.append(load_lesson(root / name))
        except ContentFileError as exc:
            errors += exc.errors
    library = _library(root, (LessonEntry.of(lesson.meta) for lesson in lessons), errors)
    library._opened.update((lesson.id, lesson) for lesson in lessons)
    return library


def json_schema() -> dict[str, Any]:
    return {
        "lesson.md front matter": LessonMeta.model_json_schema(),
        "quiz.yaml": QuizFile.model_json_schema(),
    }
