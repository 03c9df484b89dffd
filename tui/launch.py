"""What ``quant-tutor`` does before Textual is imported: the library read, the progress store
opened, and the engine process started on the lesson the app opens with.

The engine starts first so that its imports (torch, transformers: most of the time to ready)
and the app's own (Textual) share the cores instead of following each other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tui.tutor_runtime import TutorRuntime
from tutor.engine.remote import RemoteError
from tutor.engine.settings import engine_settings
from tutor.library.content import Library, load_library
from tutor.progress.errors import StoreError
from tutor.progress.store import Store


@dataclass(frozen=True)
class Launch:
    library: Library
    store: Store
    lesson_id: str  # the lesson the app opens with
    tutor: TutorRuntime  # its engine process already started


def start_lesson(library: Library, store: Store, wanted: str | None) -> str:
    """The lesson asked for, else the one the learner had open last, else the first."""
    wanted = wanted or store.last_lesson()
    return wanted if wanted in library.lessons else next(iter(library.lessons))


def launch(
    content: Path | None,
    lesson_id: str | None,
    model: str | None,
    device: str,
    remote: str | None = None,
    variants: Path | None = None,
) -> Launch | int:
    """The app's state with its engine starting, or an exit status once the reason is printed.
    ``remote``/``variants``: ``--engine URL`` and ``--variants FILE`` (tutor.engine.settings)."""
    try:
        settings = engine_settings(remote, variants)
    except RemoteError as exc:
        print(f"quant-tutor: {exc}", file=sys.stderr)
        return 2
    library = load_library(content)
    if not library.lessons:
        print("quant-tutor: no lesson could be loaded:", file=sys.stderr)
        for error in library.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    if lesson_id is not None and lesson_id not in library.lessons:
        print(f"quant-tutor: no lesson {lesson_id!r}; known: {', '.join(library.lessons)}", file=sys.stderr)
        return 2
    try:
        store = Store()
    except StoreError as exc:
        print(f"quant-tutor: {exc}", file=sys.stderr)
        return 2
    start = start_lesson(library, store, lesson_id)
    tutor = TutorRuntime(library, model=model, device=device, settings=settings)
    tutor.spawn(start)
    return Launch(library, store, start, tutor)
