"""How a query ranks the passages of an index view, and whether the lessons cover it.

The passages are ranked two ways, by embedding similarity to the query and by BM25 over plain
word tokens, and the two rankings are fused by reciprocal rank fusion; the top k sections (one
hit per section) come back, preferring the lesson the learner is reading. The question counts
as covered only when the best chunk's cosine similarity clears a threshold tuned on
``content/eval_questions.yaml`` (a slightly lower one when the lessons use the question's own
words); below it the tutor says the lesson doesn't cover it instead of asking the model. Nor
is it covered when it reads as a question about another field that uses the lessons' words
(``tutor.assistant.elsewhere``: audio bit depth, computer RAM, …).
"""

from __future__ import annotations

import numpy as np

from tutor.assistant.elsewhere import field_of
from tutor.assistant.hits import Hit, SearchResult
from tutor.assistant.search_index import IndexView
from tutor.text import clean, content_tokens

# Reciprocal rank fusion: score = 1 / (RRF_K + cosine rank) + BM25_WEIGHT / (RRF_K + BM25 rank).
# With only ~150 chunks a small RRF_K (the usual 60 is meant for long lists) lets a clear
# first place count, and BM25 gets a bit more say because MiniLM blurs rare terms such as
# "double quantization" or "desc_act". Tuned on content/eval_questions.yaml plus paraphrases.
RRF_K = 10
BM25_WEIGHT = 1.5
# A chunk of the lesson the learner is reading gets its fused score multiplied by this.
LESSON_BOOST = 1.25
# The relevance threshold. A question is covered when the best chunk's cosine similarity
# reaches COVERED_COSINE, or reaches COVERED_COSINE_KNOWN_WORDS while at least
# KNOWN_WORDS_SHARE of the question's content words occur somewhere in the lessons.
# Tuned on content/eval_questions.yaml: most on-lesson questions score 0.45 and up; the word
# check lets the lowest through (down to 0.30 once the near misses that share the lessons'
# words were declined as fields elsewhere: 3 wrong declines of 142 at 0.38, 1 at 0.30, for
# one more of 52 off-topic questions answered; with quant names whole in the index, anything
# from 0.26 to 0.37 gives 1 wrong decline and 1 answered off-topic question).
COVERED_COSINE = 0.45
COVERED_COSINE_KNOWN_WORDS = 0.30
KNOWN_WORDS_SHARE = 0.75


def rank(
    view: IndexView,
    query: str,
    query_vector: np.ndarray,
    k: int,
    lesson_id: str | None,
    fields: np.ndarray,
) -> SearchResult:
    """The top k sections of ``view`` for ``query`` (cleaned, not empty; ``view`` has passages),
    and whether they cover it; ``lesson_id`` is the lesson the learner is reading, if any, and
    ``fields`` the vectors of the fields elsewhere (``tutor.assistant.elsewhere``)."""
    chunks = view.chunks
    # Practice steps are tasks, not answers: found when a question names them
    # (tutor.assistant.intent), never by similarity ("explain it plainly" is no explanation).
    cosines = np.where(view.searchable, view.vectors @ query_vector, -1.0)
    tokens = content_tokens(query)
    bm25 = np.asarray(view.bm25.get_scores(tokens), dtype=np.float64) if tokens else np.zeros(len(chunks))
    cosine_rank = np.empty(len(chunks), dtype=np.int64)
    cosine_rank[np.argsort(-cosines, kind="stable")] = np.arange(1, len(chunks) + 1)
    bm25_rank = np.zeros(len(chunks), dtype=np.int64)  # 0: no match
    matched = np.flatnonzero(bm25 > 0)
    if matched.size:
        by_bm25 = matched[np.argsort(-bm25[matched], kind="stable")]
        bm25_rank[by_bm25] = np.arange(1, by_bm25.size + 1)
    fused = 1.0 / (RRF_K + cosine_rank)
    fused = fused + np.where(bm25_rank > 0, BM25_WEIGHT / (RRF_K + np.maximum(bm25_rank, 1)), 0.0)
    if lesson_id is not None:
        fused = fused * np.array([LESSON_BOOST if c.lesson_id == lesson_id else 1.0 for c in chunks])
    fused = np.where(view.searchable, fused, 0.0)
    order = [int(i) for i in np.argsort(-fused, kind="stable")]

    # One hit per section: its best chunk, joined by the section's other chunks that
    # also rank near the top (in lesson order), so a hit reads as one passage.
    by_section: dict[tuple[str, str], list[int]] = {}
    for position, i in enumerate(order):
        chunk = chunks[i]
        key = (chunk.lesson_id, chunk.section)
        if key in by_section:
            if position < 2 * k:
                by_section[key].append(i)
        elif len(by_section) < k:
            by_section[key] = [i]
        if position >= 2 * k and len(by_section) >= k:
            break
    closest = []
    for members in by_section.values():
        best = members[0]
        chunk = chunks[best]
        text = "\n\n".join(chunks[i].text for i in sorted(members))
        closest.append(
            Hit(
                chunk.lesson_id,
                chunk.lesson_title,
                chunk.section,
                chunk.anchor,
                clean(text),
                float(fused[best]),
                float(cosines[best]),
                int(cosine_rank[best]),
                int(bm25_rank[best]) or None,
                float(bm25[best]),
            )
        )
    best_cosine = float(cosines[int(np.argmax(cosines))])
    distinct = set(tokens)
    known_share = len(distinct & view.vocabulary) / len(distinct) if distinct else 0.0
    elsewhere = field_of(query_vector, fields, best_cosine)
    covered = is_covered(best_cosine, known_share) and not elsewhere
    return SearchResult(
        query,
        closest if covered else [],
        covered,
        closest,
        best_cosine,
        known_share,
        lesson_id=lesson_id,
        query_vector=query_vector,
        elsewhere=elsewhere,
    )


def is_covered(best_cosine: float, known_share: float) -> bool:
    """The relevance threshold (see COVERED_COSINE)."""
    if best_cosine >= COVERED_COSINE:
        return True
    return best_cosine >= COVERED_COSINE_KNOWN_WORDS and known_share >= KNOWN_WORDS_SHARE
