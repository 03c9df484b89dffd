"""The lab's on-disk cache: one JSON file per measurement, keyed by what it depends on (the
model, the device, the lesson text and its own settings), written atomically."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tutor.files import write_atomic
from tutor.lab.windows import content_hash
from tutor.library.content import Library
from tutor.paths import cache_dir

if TYPE_CHECKING:
    from tutor.engine import Engine


def cache_key(engine: Engine, library: Library, **settings: Any) -> dict[str, Any]:
    """What every cached lab measurement depends on: the model, the device, the kernels that
    read a prompt, the lesson text, and the measurement's own ``settings``."""
    return {
        "model": str(engine.checkpoint.path),
        "device": engine.device,
        "arithmetic": engine.arithmetic,
        "content": content_hash(library),
        **settings,
    }


def cache_file(key: dict[str, Any], folder: Path | None, name: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (folder or cache_dir()) / "cliff" / f"{name}-{digest}.json"


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, partial(_write_json, data))


def _write_json(data: Any, handle: IO[bytes]) -> None:
    handle.write(json.dumps(data).encode())


def read_json(path: Path) -> Any:
    """A cached measurement, or None when it is absent or unreadable (then it is measured again
    and rewritten)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
