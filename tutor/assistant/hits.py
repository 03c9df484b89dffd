"""What a search returns: the passages found (:class:`Hit`) and the verdict on the question
(:class:`SearchResult`), as the quote, the support check and the tutor's answer read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Hit:
    lesson_id: str
    lesson_title: str
    section: str
    anchor: str
    text: str  # cleaned of control characters; Markdown as in the lesson
    score: float  # fused RRF score (with the current-lesson boost)
    cosine: float  # embedding similarity to the query, -1..1
    cosine_rank: int  # 1-based
    bm25_rank: int | None  # 1-based; None when BM25 found none of the query's words
    bm25: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "lesson": self.lesson_id,
            "section": self.section,
            "anchor": self.anchor,
            "text": self.text,
            "score": round(self.score, 5),
            "cosine": round(self.cosine, 4),
            "bm25_rank": self.bm25_rank,
        }


@dataclass(frozen=True)
class SearchResult:
    query: str
    hits: list[Hit]  # the top k when covered, else empty
    covered: bool
    closest: list[Hit]  # the top k by fused score (one per section), whether covered or not
    best_cosine: float  # the threshold's input: the best chunk's cosine similarity
    known_share: float = 0.0  # share of the query's content words that occur in the lessons
    elapsed_ms: float = 0.0
    lesson_id: str | None = None
    query_vector: np.ndarray | None = field(default=None, repr=False, compare=False)
    elsewhere: str = ""  # the field elsewhere the query reads as (tutor.assistant.elsewhere), if any

    @property
    def sections(self) -> list[tuple[str, str]]:
        return [(h.lesson_id, h.section) for h in self.hits]
