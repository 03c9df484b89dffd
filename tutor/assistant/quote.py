"""The lesson's own words that answer a question: the quote the learner reads first.

A quote is a span of one or two consecutive sentences of a retrieved passage. A sentence that
leans on the one before it ("That is why …", "This is …") or says too little on its own
("GGUF names follow a pattern.") only comes with its predecessor. Spans are ranked by how
well they fit the question: embedding similarity, the share of the question's words they
contain, whether their form matches the question's type (a "why" question wants a
reason, a "how much" question a number, "what is X" a definition), and whether they name every
one of the things a question names ("a 7B model in int8": the row for 7B at int8, not the one
about LLM.int8() at 6.7B); a span from a lower-ranked
passage pays a small penalty, and a two-sentence span must earn its length. A question that
names a lesson part ("what's the gist?", "what's step two?") is quoted two sentences of that
part: a premise, summary or practice step is written as a point and the sentence that carries
it, and the first alone (or the second alone) is half of what the learner asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tutor.assistant.contradiction import names
from tutor.assistant.embedder import Embedder
from tutor.assistant.hits import Hit
from tutor.assistant.intent import QuestionType, question_type
from tutor.text import clean, content_tokens, sentences

# Tuned on content/eval_questions.yaml (key facts); see the evaluation in tutor.assistant.evaluation.
OVERLAP_WEIGHT = 0.5  # times the share of the question's content words the span contains
RANK_PENALTY = 0.2  # per place the span's passage ranks below the first
TYPE_BONUS = 0.1  # a span whose form matches the question's type
PAIR_PENALTY = 0.04  # a two-sentence span must beat its best single sentence by this much
NAMES_BONUS = 0.15  # a span naming every one of the two or more things the question names
MIN_WORDS = 10  # a sentence shorter than this does not stand alone
MIN_ANY_WORDS = 4  # nor is anything shorter than this quoted when something longer exists

# A sentence that opens with one of these refers back to the sentence before it.
_ANAPHOR = re.compile(
    r"^(?:that|this|these|those|it|its|they|their|such|so|thus|hence|then|but|also|however|"
    r"instead|otherwise|here|there|both|either|neither|the same|in that case|for that reason|"
    r"as a result|in other words|that's|it's)\b",
    re.IGNORECASE,
)


_FORMS: dict[QuestionType, re.Pattern[str]] = {
    "why": re.compile(
        r"\bbecause\b|\bsince\b|\bso that\b|\bwhy\b|\breason\b|\bwhich means\b|\bcauses?\b|"
        r"\blimited by\b|\bdue to\b|\bfor that\b|\bthat is why\b|\bso\b"
    ),
    "how_much": re.compile(r"\d"),
    "which": re.compile(r"\b(?:better|best|prefer|use|choose|pick|over|instead|than|beats?|usually)\b"),
    "define": re.compile(r"\b(?:is|are|means?|stands? for|refers? to|called)\b|:"),
    "how": re.compile(r"\b(?:by|multiply|divide|run|use|step|first|then|compare|count|measure)\b|[×÷=]"),
    "yes_no": re.compile(r"\b(?:not|no|cannot|can't|yes|does|only|never|always|usually)\b"),
}


def fits_type(kind: QuestionType, text: str) -> bool:
    pattern = _FORMS.get(kind)
    return bool(pattern and pattern.search(text.casefold()))


def refers_back(sentence: str) -> bool:
    """Whether a sentence opens by pointing at the one before it."""
    return bool(_ANAPHOR.match(sentence.lstrip("\"'“‘(*")))


def leans_back(sentence: str) -> bool:
    """Whether a sentence needs the one before it to be understood."""
    return refers_back(sentence) or len(sentence.split()) < MIN_WORDS


@dataclass(frozen=True)
class Quote:
    """One or two consecutive sentences from a lesson, shown as-is and quoted."""

    text: str
    lesson_id: str
    section: str
    lesson_title: str = ""
    score: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "lesson": self.lesson_id,
            "section": self.section,
            "title": self.lesson_title,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quote:
        return cls(data["text"], data["lesson"], data["section"], data.get("title", ""))


@dataclass(frozen=True)
class Span:
    text: str
    hit: Hit
    rank: int  # of its passage, 0 for the first
    pair: bool  # two sentences


def spans(hits: Sequence[Hit]) -> list[Span]:
    """Every quotable span of the passages: sentences that stand alone, and sentence pairs."""
    seen: set[str] = set()
    out: list[Span] = []
    for rank, hit in enumerate(hits):
        said = sentences(hit.text)
        for i, sentence in enumerate(said):
            candidates = []
            if not leans_back(sentence) or i == 0:
                candidates.append((sentence, False))
            # A pair opening with "That …" would quote the reference without what it refers to.
            if i + 1 < len(said) and (not refers_back(sentence) or i == 0):
                candidates.append((f"{sentence} {said[i + 1]}", True))
            for text, pair in candidates:
                if text not in seen:
                    seen.add(text)
                    out.append(Span(text, hit, rank, pair))
    return out


def best_quote(
    question: str,
    hits: Sequence[Hit],
    embed: Embedder,
    query_vector: np.ndarray | None = None,
    whole_part: bool = False,
) -> Quote | None:
    """The span of the retrieved passages that best answers ``question`` (None without passages);
    with ``whole_part`` (the question names a lesson part), a two-sentence span where there is one."""
    candidates = spans(hits)
    long_enough = [c for c in candidates if len(c.text.split()) >= MIN_ANY_WORDS]
    candidates = long_enough or candidates
    if whole_part:
        candidates = [c for c in candidates if c.pair] or candidates
    if not candidates:
        return None
    if query_vector is None:
        query_vector = embed([question])[0]
    cosines = embed([c.text for c in candidates]) @ query_vector
    asked = content_tokens(question)
    kind = question_type(question)
    named = names(question)
    scores = [
        float(cosine)
        + OVERLAP_WEIGHT * overlap(asked, set(content_tokens(c.text)))
        + TYPE_BONUS * fits_type(kind, c.text)
        + NAMES_BONUS * names_all(named, c.text)
        - RANK_PENALTY * c.rank
        - PAIR_PENALTY * c.pair
        for cosine, c in zip(cosines, candidates, strict=True)
    ]
    best = int(np.argmax(scores))
    chosen = candidates[best]
    return Quote(
        clean(chosen.text), chosen.hit.lesson_id, chosen.hit.section, chosen.hit.lesson_title, scores[best]
    )


def names_all(named: Sequence[str], text: str) -> bool:
    """Whether ``text`` names each of ``named`` (two or more: "BF16 … compared with FP16")."""
    return len(named) >= 2 and set(named) <= set(names(text))


def overlap(tokens: Sequence[str], reference: set[str]) -> float:
    """Share of ``tokens`` (distinct) that occur in ``reference``."""
    distinct = set(tokens)
    return len(distinct & reference) / len(distinct) if distinct else 0.0
