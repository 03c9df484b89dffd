"""The searchable index in memory: each indexed lesson's passages, vectors and BM25 tokens, and
the immutable view a search reads (the indexed lessons together, with BM25 and the vocabulary
of the off-topic check over exactly those)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tutor.assistant.chunks import PRACTICE, Chunk
from tutor.assistant.embedder import EMBED_DIM
from tutor.text import content_tokens


@dataclass
class IndexedLesson:
    """One lesson's passages, their vectors and their BM25 tokens."""

    lesson_id: str
    chunks: list[Chunk]
    vectors: np.ndarray
    documents: list[list[str]]  # BM25 tokens per chunk

    @classmethod
    def of(cls, chunks: list[Chunk], vectors: np.ndarray) -> IndexedLesson:
        documents = [content_tokens(c.embed_text()) or ["_"] for c in chunks]
        return cls(chunks[0].lesson_id, chunks, vectors, documents)


@dataclass(frozen=True)
class IndexView:
    """What a search reads: the indexed lessons' passages in catalogue order, with BM25 and the
    vocabulary over exactly those. Never changed once built; a new one replaces it."""

    lessons: frozenset[str]
    chunks: list[Chunk]
    vectors: np.ndarray
    bm25: Any
    vocabulary: frozenset[str]
    searchable: np.ndarray  # False for practice steps

    @classmethod
    def of(cls, indexed: Sequence[IndexedLesson]) -> IndexView:
        from rank_bm25 import BM25Okapi

        chunks = [c for lesson in indexed for c in lesson.chunks]
        documents = [d for lesson in indexed for d in lesson.documents]
        vectors = (
            np.vstack([lesson.vectors for lesson in indexed])
            if indexed
            else np.zeros((0, EMBED_DIM), np.float32)
        )
        # Each lesson's rows become a slice of the new matrix, so the vectors are held once.
        start = 0
        for lesson in indexed:
            lesson.vectors = vectors[start : start + len(lesson.chunks)]
            start += len(lesson.chunks)
        return cls(
            frozenset(lesson.lesson_id for lesson in indexed),
            chunks,
            vectors,
            BM25Okapi(documents) if documents else None,
            frozenset(t for doc in documents for t in doc),
            np.array([c.section != PRACTICE for c in chunks], dtype=bool),
        )
