"""A large, valid lesson library made from the shipped lessons: for tests and measurements of scale.

Each generated lesson is a shipped lesson with a new id, title and track (and two related
lessons among the generated ones); its body and quiz are copied unchanged, so every one of
them passes ``quant-tutor validate``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tutor.library.content import default_content_dir, split_front_matter

TRACKS = (
    "Creators · Model Families",
    "Creators · File Formats",
    "Builders · Serving",
    "Builders · Hardware",
    "Researchers · Methods",
    "Researchers · Evaluation",
    "Learners · Foundations",
    "Learners · Practice",
)
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def generated_id(source_id: str, number: int) -> str:
    return f"{source_id}-{number:04d}"


def _sources(source: Path) -> list[Path]:
    return sorted(p for p in source.iterdir() if (p / "lesson.md").is_file() and (p / "quiz.yaml").is_file())


def generate_library(dest: Path, count: int, source: Path | None = None) -> list[str]:
    """Write ``count`` lesson folders under ``dest`` (created), cycling through the lessons of
    ``source`` (the shipped ones by default); return their ids in the order written."""
    folders = _sources(source or default_content_dir())
    ids = [generated_id(folders[n % len(folders)].name, n) for n in range(count)]
    dest.mkdir(parents=True, exist_ok=True)
    for number, lesson_id in enumerate(ids):
        origin = folders[number % len(folders)]
        related = [ids[(number + step) % count] for step in (1, 2) if count > step]
        _write_lesson(origin, dest / lesson_id, number, related)
    return ids


def _write_lesson(origin: Path, folder: Path, number: int, related: list[str]) -> None:
    lesson_file = origin / "lesson.md"
    front, body, _line = split_front_matter(lesson_file.read_text(encoding="utf-8"), lesson_file)
    meta = yaml.load(front, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    meta.update(
        id=folder.name,
        title=f"{meta['title']} (part {number + 1})",
        track=TRACKS[number % len(TRACKS)],
        related=related,
    )
    folder.mkdir(parents=True, exist_ok=True)
    front_matter = yaml.dump(meta, Dumper=_DUMPER, sort_keys=False, allow_unicode=True, width=10_000)
    (folder / "lesson.md").write_text(f"---\n{front_matter}---\n{body}", encoding="utf-8")
    shutil.copyfile(origin / "quiz.yaml", folder / "quiz.yaml")
