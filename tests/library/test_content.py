"""Shipped lessons validate; broken files name file, field and line; others still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, SEED
from tutor.library.content import Library, load_library, parse_sections, validate_library
from tutor.library.models import QUIZ_LENGTH
from tutor.library.plain import markdown_as_plain, plain_text

RELATED = ["hermes-q4-vs-q8", "gguf-awq-gptq-decision", "fp16-q8-q6-q5-q4"]


def test_every_shipped_lesson_validates(library: Library) -> None:
    assert library.errors == []
    assert list(library.lessons) == [SEED, *RELATED]
    for lesson in library.ordered():
        assert len(lesson.questions) == QUIZ_LENGTH
        assert len(lesson.meta.practice) == 3
        headings = {s.heading for s in lesson.sections}
        assert {q.source for q in lesson.questions} <= headings
        assert set(lesson.meta.related) <= set(library.lessons) - {lesson.id}
        answers = {q.answer for q in lesson.questions}
        assert len(answers) >= 3, f"{lesson.id}: the right answer sits in too few positions"


def test_seed_lesson_covers_the_page(library: Library) -> None:
    lesson = library.get(SEED)
    terms = {t.term.casefold() for t in lesson.meta.key_terms}
    for term in [
        "quantization",
        "int8",
        "int4",
        "nf4",
        "fp4",
        "calibration",
        "gptq",
        "awq",
        "gguf",
        "perplexity",
        "quality cliff",
        "memory footprint",
        "throughput",
    ]:
        assert any(term in t for t in terms), term
    assert lesson.section("What quantization does well") is not None
    assert lesson.section("What quantization cannot do") is not None
    assert lesson.meta.related == RELATED
    text = plain_text(lesson)
    for fact in ["14 GB", "outlier", "QLoRA", "calibration", "Q4_K_M", "KL divergence"]:
        assert fact in text, fact


def _copy_content(tmp_path: Path) -> Path:
    dest = tmp_path / "content"
    shutil.copytree(ROOT / "content", dest)
    return dest


def _break(root: Path, lesson: str, name: str, old: str, new: str) -> Path:
    path = root / lesson / name
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_bad_field_names_file_field_and_line(tmp_path: Path) -> None:
    root = _copy_content(tmp_path)
    path = _break(root, "hermes-q4-vs-q8", "lesson.md", "minutes: 9", "minutes: nine")
    library = load_library(root)
    assert "hermes-q4-vs-q8" not in library.lessons
    assert len(library.lessons) == 3, "the other lessons still load"
    [error] = [e for e in library.errors if e.file == path]
    assert error.field == "minutes"
    assert error.line == _line_of(path, "minutes: nine")
    assert f"{path}:{error.line}: minutes:" in str(error)


def test_quiz_errors_point_at_the_question(tmp_path: Path) -> None:
    root = _copy_content(tmp_path)
    quiz = root / SEED / "quiz.yaml"
    first_answer = next(line for line in quiz.read_text().splitlines() if line.strip().startswith("answer:"))
    _break(root, SEED, "quiz.yaml", first_answer, first_answer.split(":")[0] + ": e")
    library = validate_library(root)
    assert SEED not in library.lessons
    [error] = [e for e in library.errors if e.file == quiz]
    assert error.field == "questions.0.answer"
    assert error.line == _line_of(quiz, "answer: e")


def test_source_must_be_a_heading(tmp_path: Path, library: Library) -> None:
    root = _copy_content(tmp_path)
    source = library.get(SEED).questions[2].source
    quiz = root / SEED / "quiz.yaml"
    lines = quiz.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if line.strip().startswith("source:")]
    lines[hits[2]] = lines[hits[2]].replace(source, "No Such Section")
    quiz.write_text("\n".join(lines) + "\n")
    errors = [e for e in validate_library(root).errors if e.file == quiz]
    assert [e.field for e in errors] == ["questions.2.source"]
    assert errors[0].line == hits[2] + 1
    assert "No Such Section" in errors[0].message


def test_invalid_yaml_and_wrong_count(tmp_path: Path) -> None:
    root = _copy_content(tmp_path)
    lesson = root / "gguf-awq-gptq-decision" / "lesson.md"
    text = lesson.read_text().splitlines()
    text[2] = text[2] + ": : ["
    lesson.write_text("\n".join(text) + "\n")
    quiz = root / "fp16-q8-q6-q5-q4" / "quiz.yaml"
    data = quiz.read_text()
    quiz.write_text(data[: data.rindex("\n  - id:")] + "\n")
    library = validate_library(root)
    assert list(library.lessons) == [SEED, "hermes-q4-vs-q8"]
    by_file = {e.file: e for e in library.errors}
    assert "not valid YAML" in by_file[lesson].message and by_file[lesson].line is not None
    assert by_file[quiz].field == "questions" and "10" in by_file[quiz].message


@pytest.mark.parametrize("text", ["no front matter\n", "---\nid: x\n"])
def test_front_matter_problems(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "content" / "x"
    folder.mkdir(parents=True)
    (folder / "lesson.md").write_text(text)
    library = load_library(tmp_path / "content")
    assert not library.lessons
    [error] = library.errors
    assert error.file == folder / "lesson.md" and error.line == 1


def test_schema_is_json_schema() -> None:
    from tutor.library.content import json_schema

    schema = json.loads(json.dumps(json_schema()))
    assert schema["quiz.yaml"]["properties"]["questions"]["minItems"] == QUIZ_LENGTH
    assert "key_terms" in schema["lesson.md front matter"]["required"]


def test_sections_split_at_level_two_and_three_headings_only() -> None:
    body = "# Title\nintro\n## Why\nbecause\n#### Aside\nstill why\n### How\nlike so"
    sections = parse_sections(body, 1)
    assert [(s.heading, s.level) for s in sections] == [("Why", 2), ("How", 3)]
    assert "#### Aside" in sections[0].body


def test_headings_are_read_as_markdown_reads_them() -> None:
    """What the lesson tab shows as a level-2 or level-3 heading is a section; a ``##`` line in
    code is not (the regex split at one in a ``~~~`` fence, or in a fence of four backticks
    that shows three, and cut the ``#`` off "C#")."""
    body = "\n".join(
        [
            "## Shell",
            "~~~sh",
            "## not a section: a comment in the code",
            "~~~",
            "````markdown",
            "```",
            "## not a section either",
            "```",
            "````",
            "## C#",
            "text",
            "   ### Indented three spaces",
            "    ## indented four: code",
            "Underlined",
            "----------",
            "last",
        ]
    )
    sections = parse_sections(body, 10)
    assert [(s.heading, s.level, s.line) for s in sections] == [
        ("Shell", 2, 10),
        ("C#", 2, 19),
        ("Indented three spaces", 3, 21),
        ("Underlined", 2, 23),
    ]
    assert "## not a section either" in sections[0].body and sections[0].body.endswith("````")
    assert sections[2].body == "## indented four: code"  # a section's text is stripped
    assert sections[3].body == "last"


def test_plain_text_keeps_code_as_code() -> None:
    """A comment in a code block stays a line of code (the regex underlined it as a heading and
    left a stray backtick for each fence); marks inside code spans stay."""
    markdown = "\n".join(
        [
            "## Download",
            "",
            "Run `a*b*c` in **two**",
            "*steps*:",
            "",
            "```sh",
            "# fetch the model",
            "| not | a table |",
            "```",
            "",
            "- see [the lab](quant-tutor:lab) and [a \\| pipe](https://example.org/a_(b))",
            "",
            "| Type | Bits |",
            "|---|--:|",
            "| `Q4_K_M` | 4.9 \\| 4.8 |",
        ]
    )
    assert markdown_as_plain(markdown).splitlines() == [
        "Download",
        "========",
        "",
        "Run a*b*c in two",
        "steps:",
        "",
        "    # fetch the model",
        "    | not | a table |",
        "",
        "- see the lab and a | pipe (https://example.org/a_(b))",
        "",
        "Type    Bits",
        "------  ---------",
        "Q4_K_M  4.9 | 4.8",
    ]
