"""The text every lab measurement reads: all lessons as their authors wrote them, cut into fixed
token windows, and which of those windows a plan scores."""

from __future__ import annotations

import hashlib
from typing import Any

from tutor.library.content import Library
from tutor.library.models import Lesson

WINDOW = 256  # tokens per window (the cliff's default)


def content_hash(library: Library) -> str:
    digest = hashlib.sha256()
    for lesson in library.ordered():
        digest.update(lesson.id.encode())
        digest.update(lesson_text(lesson).encode())
    return digest.hexdigest()[:16]


def lesson_text(lesson: Lesson) -> str:
    """The text the cliff is measured on: the lesson as its author wrote it (Markdown source),
    not as ``read`` lays it out, so a change of presentation does not move the figures."""
    meta = lesson.meta
    out = [meta.title, f"{meta.track} · about {meta.minutes} min read", "", "The premise", meta.premise, ""]
    out += [lesson.body.strip(), "", "Key terms", *(f"- {t.term}: {t.definition}" for t in meta.key_terms)]
    out += ["", "Practice", *(f"{i}. {s.title}: {s.prompt}" for i, s in enumerate(meta.practice, 1))]
    return "\n".join(out) + "\n"


def lesson_windows(tokenizer: Any, library: Library, window: int = WINDOW) -> list[list[int]]:
    """Fixed windows of ``window`` tokens over all lesson text (the last partial one dropped)."""
    ids: list[int] = []
    for lesson in library.ordered():
        ids += tokenizer(lesson_text(lesson), add_special_tokens=False)["input_ids"]
    return [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]


def pick_windows(total: int, *, first: int | None = None, spread: int | None = None) -> list[int]:
    """Indices of the windows to score out of ``total``.

    ``first``: the first N; else ``spread``: N spread evenly over all lesson text (each the
    middle window of its stretch); else all of them.
    """
    if first is not None:
        return list(range(max(0, min(first, total))))
    if spread is None or spread >= total:
        return list(range(total))
    if spread <= 0:
        return []
    return [(2 * i + 1) * total // (2 * spread) for i in range(spread)]
