"""Each lesson's passage vectors on disk: one small file per lesson, keyed by its content.

A lesson's file, ``<index dir>/<lesson id>.<key>.npz``, holds its passages' embeddings and the
passages themselves (so a cached lesson is searchable without parsing it). The key hashes the
lesson's ``lesson.md`` bytes (every passage comes from that file), the embedding model's id and
the index format, so an edited lesson, a new model or new chunking rules miss the cache and that
lesson alone is embedded again. Files are written atomically; one that is missing, unreadable
or from another key reads as "not cached", never as an error.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tutor.files import write_atomic

INDEX_FORMAT = 5  # bump when the chunking, the embedded text or this file's layout changes


def lesson_key(lesson_md: bytes, model_name: str) -> str:
    digest = hashlib.sha256(f"format {INDEX_FORMAT}\nmodel {model_name}\n".encode())
    digest.update(lesson_md)
    return digest.hexdigest()


def _path(index_dir: Path, lesson_id: str, key: str) -> Path:
    # Lesson ids never hold a dot, so "<id>.*" finds this lesson's files and no other lesson's.
    return index_dir / f"{lesson_id}.{key[:24]}.npz"


def read_vectors(index_dir: Path, lesson_id: str, key: str) -> tuple[list[dict[str, Any]], np.ndarray] | None:
    """The cached passages (as written by :func:`write_vectors`) and their vectors, or None."""
    try:
        with np.load(_path(index_dir, lesson_id, key), allow_pickle=False) as stored:
            meta = json.loads(stored["meta"].tobytes().decode("utf-8"))
            vectors = stored["vectors"]
    except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile, EOFError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("passages"), list):
        return None
    passages = meta["passages"]
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(passages):
        return None
    return passages, vectors


def write_vectors(
    index_dir: Path, lesson_id: str, key: str, passages: list[dict[str, Any]], vectors: np.ndarray
) -> None:
    """Cache one lesson's passages and vectors, replacing its older versions."""
    path = _path(index_dir, lesson_id, key)
    meta = json.dumps({"key": key, "passages": passages}, ensure_ascii=False).encode("utf-8")
    try:
        write_atomic(
            path,
            lambda handle: np.savez(
                handle, vectors=vectors.astype(np.float32), meta=np.frombuffer(meta, dtype=np.uint8)
            ),
        )
        for stale in index_dir.glob(f"{lesson_id}.*.npz"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache only costs embedding this lesson again next time
