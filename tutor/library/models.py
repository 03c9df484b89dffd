"""What a lesson is, as data: the front matter and quiz schemas (pydantic, strict), a parsed
lesson and its sections, the catalogue's entries, and the errors that name a file and a line."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LETTERS = "abcd"
QUIZ_LENGTH = 10
_ID_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class KeyTerm(Strict):
    term: str = Field(min_length=1, description="The term as the lesson uses it.")
    definition: str = Field(min_length=1, description="One line, in plain words.")

    @field_validator("definition")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value:
            raise ValueError("a key-term definition must fit on one line")
        return value


class PracticeStep(Strict):
    title: str = Field(min_length=1, description="Short name of the step.")
    prompt: str = Field(min_length=1, description="What the learner is asked to do.")
    tutor_question: str | None = Field(
        default=None, description="Question to prefill when the step opens the tutor."
    )


class LessonMeta(Strict):
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


class Choice(Strict):
    text: str = Field(min_length=1)
    feedback: str = Field(min_length=1, description="Shown after the learner picks this choice.")


class Question(Strict):
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


class QuizFile(Strict):
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


class LessonEntry(Strict):
    """What lists show about a lesson, taken from its front matter alone: the library index's row."""

    id: str
    title: str
    track: str
    minutes: int
    summary: str
    related: tuple[str, ...]
    steps: int  # practice steps

    @classmethod
    def of(cls, meta: LessonMeta) -> LessonEntry:
        return cls(
            id=meta.id,
            title=meta.title,
            track=meta.track,
            minutes=meta.minutes,
            summary=meta.summary,
            related=tuple(meta.related),
            steps=len(meta.practice),
        )


class ContentFileError(Exception):
    def __init__(self, errors: Sequence[ContentError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = list(errors)
