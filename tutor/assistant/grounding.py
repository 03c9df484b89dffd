"""Turn retrieved passages into a tutor answer that is honest about a weak model.

The flow for one question (:func:`answer`, or :func:`prepare` then :func:`finish`
when the caller streams the model itself):

1. retrieve (``tutor.assistant.retrieval``); when nothing clears the relevance threshold the
   tutor declines, "The lesson doesn't cover that.", points to the closest sections,
   and the model is never called;
2. pick the lesson's own sentence or two that best answer the question
   (:func:`tutor.assistant.quote.best_quote`): what the learner reads first, quoted, so the answer is
   right even when the model is not;
3. build a short prompt from the passages (:func:`build_messages`) and let the model
   explain;
4. check every sentence the model wrote against the cited passages
   (:func:`check_support`): supported, or not found in the lesson.

Nothing here imports the model engine: ``generate`` is any callable from chat
messages to ``(text, stats)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tutor.assistant.answer_stats import AnswerStats
from tutor.assistant.contradiction import contradiction
from tutor.assistant.intent import LessonPart, lesson_part
from tutor.assistant.quote import Quote, best_quote, overlap
from tutor.assistant.retrieval import Embedder, Hit, SearchResult
from tutor.text import clean, content_tokens, sentences, word_set

if TYPE_CHECKING:  # pragma: no cover
    from tutor.assistant.retrieval import Retriever

Messages = list[dict[str, str]]
Generate = Callable[[Messages], tuple[str, AnswerStats]]

DECLINE = "The lesson doesn't cover that."
MAX_QUESTION_CHARS = 500
# The prompt's passages stay under this many tokens (estimated at 4 characters a token),
# so the prompt fits SmolLM2-135M's small context with room for the answer.
PASSAGE_TOKEN_BUDGET = 700
CHARS_PER_TOKEN = 4

# Support check, tuned on the `claims` in content/eval_questions.yaml: a generated sentence
# is supported when SUPPORT_COSINE_WEIGHT * cosine + (1 - weight) * overlap reaches
# SUPPORT_THRESHOLD, where cosine is its best embedding similarity to a passage sentence
# of the same polarity (both negated or both not) and overlap the share of its content
# words found in the passages; and every number it states occurs in the passages.
SUPPORT_COSINE_WEIGHT = 0.6
SUPPORT_THRESHOLD = 0.75
# Not supported when the closest passage sentence has the opposite polarity, is close
# (cosine at least CONTRADICTION_MIN_COSINE) and beats the best same-polarity one by
# CONTRADICTION_MARGIN: "4-bit is not usable for chat" against "int4 is usable for chat".
CONTRADICTION_MARGIN = 0.1
CONTRADICTION_MIN_COSINE = 0.5
# Also contradicted when one of the CLASH_NEIGHBOURS closest passage sentences (cosine at
# least CLASH_MIN_COSINE) gives another number in the same unit, the opposite word, or the
# same two names the other way round (tutor.assistant.contradiction).
CLASH_NEIGHBOURS = 2
CLASH_MIN_COSINE = 0.6

# --- results ------------------------------------------------------------------------

Verdict = Literal["supported", "not_found", "contradicts"]
MARKS: dict[Verdict, str] = {
    "supported": "✓ supported by the lesson",
    "not_found": "? not found in the lesson",
    "contradicts": "✗ contradicts the lesson",
}


@dataclass(frozen=True)
class SentenceCheck:
    text: str
    supported: bool
    score: float  # 0..1, the combined cosine and overlap
    evidence: str = ""  # the passage sentence it matched best (or the one it contradicts)
    reason: str = ""  # why it is not supported: "", "weak match", "number not in the lesson", ...
    contradicts: bool = False  # the lesson says otherwise (not merely: the lesson doesn't say it)

    @property
    def verdict(self) -> Verdict:
        if self.supported:
            return "supported"
        return "contradicts" if self.contradicts else "not_found"

    @property
    def mark(self) -> str:
        """The mark the learner sees, in words as well as a symbol."""
        return MARKS[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "supported": self.supported,
            "verdict": self.verdict,
            "score": round(self.score, 3),
            "reason": self.reason,
            "evidence": self.evidence,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SentenceCheck:
        return cls(
            data["text"],
            bool(data["supported"]),
            float(data["score"]),
            data.get("evidence", ""),
            data.get("reason", ""),
            data.get("verdict") == "contradicts",
        )


@dataclass(frozen=True)
class Citation:
    lesson_id: str
    section: str
    text: str
    score: float  # cosine similarity of the passage to the question
    anchor: str = ""
    lesson_title: str = ""

    @classmethod
    def from_hit(cls, hit: Hit) -> Citation:
        return cls(hit.lesson_id, hit.section, hit.text, hit.cosine, hit.anchor, hit.lesson_title)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lesson": self.lesson_id,
            "section": self.section,
            "text": self.text,
            "score": round(self.score, 3),
            "anchor": self.anchor,
            "title": self.lesson_title,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Citation:
        return cls(
            data["lesson"],
            data["section"],
            data["text"],
            data["score"],
            data["anchor"],
            data.get("title", ""),
        )


@dataclass
class TutorAnswer:
    """One answer: the quote first, then the model's text and its support check."""

    question: str
    answer: str  # what the learner reads first: the quoted lesson sentence, or the decline
    grounded: bool  # False exactly when the tutor declined (the lesson doesn't cover it)
    generated: str = ""  # the model's text alone ("" when declined or no model ran)
    precision: str | None = None
    citations: list[Citation] = field(default_factory=list)
    sentences: list[SentenceCheck] = field(default_factory=list)
    stats: AnswerStats = field(default_factory=AnswerStats)
    quote: Quote | None = None
    see_also: list[Citation] = field(default_factory=list)  # closest sections when declined
    lesson_id: str | None = None

    @property
    def supported_share(self) -> float | None:
        if not self.sentences:
            return None
        return sum(s.supported for s in self.sentences) / len(self.sentences)

    def as_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.answer,
            "generated": self.generated,
            "precision": self.precision,
            "grounded": self.grounded,
            "citations": [c.as_dict() for c in self.citations],
            "sentences": [s.as_dict() for s in self.sentences],
            "stats": self.stats.as_dict(),
            "quote": self.quote.as_dict() if self.quote else None,
            "see_also": [
                {"lesson": c.lesson_id, "section": c.section, "title": c.lesson_title} for c in self.see_also
            ],
            "lesson_id": self.lesson_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TutorAnswer:
        """The answer as the engine process sent it (``as_dict``'s inverse, for the app)."""
        return cls(
            question=data["question"],
            answer=data["answer"],
            grounded=data["grounded"],
            generated=data["generated"],
            precision=data["precision"],
            citations=[Citation.from_dict(c) for c in data["citations"]],
            sentences=[SentenceCheck.from_dict(s) for s in data["sentences"]],
            stats=AnswerStats.from_dict(data["stats"]),
            quote=Quote.from_dict(data["quote"]) if data["quote"] else None,
            see_also=[
                Citation(c["lesson"], c["section"], "", 0.0, lesson_title=c["title"])
                for c in data["see_also"]
            ],
            lesson_id=data.get("lesson_id"),
        )


# --- the prompt ---------------------------------------------------------------------

PromptStyle = Literal["user", "system"]


def _cut(text: str, max_chars: int) -> str:
    """``text`` cut at a sentence boundary to at most ``max_chars`` (at least one sentence)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    kept: list[str] = []
    for sentence in sentences(text):
        if kept and len(" ".join([*kept, sentence])) > max_chars:
            break
        kept.append(sentence)
    joined = " ".join(kept)
    return joined if len(joined) <= max_chars else joined[: max(0, max_chars - 1)].rstrip() + "…"


def passage_block(hits: Sequence[Hit], token_budget: int = PASSAGE_TOKEN_BUDGET) -> str:
    """The passages, numbered and named by section, together under ``token_budget``."""
    lines = []
    remaining = token_budget * CHARS_PER_TOKEN
    for number, hit in enumerate(hits, 1):
        share = remaining // (len(hits) - number + 1)
        prose = " ".join(sentences(hit.text))
        text = _cut(prose, max(share, 80))
        remaining -= len(text)
        lines.append(f"[{number}] {hit.section}: {text}")
    return "\n".join(lines)


def build_messages(
    question: str,
    hits: Sequence[Hit],
    max_sentences: int = 3,
    style: PromptStyle = "user",
    token_budget: int = PASSAGE_TOKEN_BUDGET,
) -> Messages:
    """Chat messages asking for a short, friendly answer from the passages only.

    ``style="user"`` puts the passages in the user turn next to the question (small
    models follow the user turn best); ``"system"`` puts them in the system prompt.
    """
    question = limit_question(question)[0]
    passages = passage_block(hits, token_budget)
    rules = (
        "You are a friendly tutor. Answer the learner's question using only the passages "
        f"from the lesson. Reply in at most {max_sentences} short sentences. "
        "If the passages do not answer it, say the lesson doesn't cover it."
    )
    if style == "system":
        return [
            {"role": "system", "content": f"{rules}\n\nPassages:\n{passages}"},
            {"role": "user", "content": question},
        ]
    return [
        {"role": "system", "content": rules},
        {"role": "user", "content": f"Passages:\n{passages}\n\nQuestion: {question}"},
    ]


def contrast_messages(messages: Messages) -> Messages:
    """The same request without the passages: the "without context" side of context-aware
    decoding (the rules and the question, nothing to ground them)."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] == "user" and "\n\nQuestion: " in content:
            content = "Question: " + content.split("\n\nQuestion: ", 1)[1]
        elif message["role"] == "system" and "\n\nPassages:\n" in content:
            content = content.split("\n\nPassages:\n", 1)[0]
        out.append({"role": message["role"], "content": content})
    return out


def limit_question(text: str) -> tuple[str, bool]:
    """The question cleaned of control characters and cut to MAX_QUESTION_CHARS; True if cut."""
    text = " ".join(clean(text).split())
    if len(text) <= MAX_QUESTION_CHARS:
        return text, False
    return text[:MAX_QUESTION_CHARS].rstrip(), True


# --- declining ----------------------------------------------------------------------


def decline_message(result: SearchResult, lesson_id: str | None = None, max_sections: int = 2) -> str:
    """ "The lesson doesn't cover that." plus where the lessons come closest."""
    closest = result.closest[:max_sections]
    if not closest:
        return DECLINE
    named = [f"“{h.section}” ({h.lesson_title})" for h in closest]
    text = f"{DECLINE} The closest sections are {' and '.join(named)}."
    if lesson_id is not None and closest[0].lesson_id != lesson_id:
        text += f" The related lesson “{closest[0].lesson_title}” comes closest."
    return clean(text)


# --- the quote ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    text: str
    hit: Hit
    rank: int  # 0 for the first passage


def _candidates(hits: Sequence[Hit]) -> list[_Candidate]:
    seen: set[str] = set()
    out = []
    for rank, hit in enumerate(hits):
        for sentence in sentences(hit.text):
            if sentence not in seen:
                seen.add(sentence)
                out.append(_Candidate(sentence, hit, rank))
    return out


# --- the support check --------------------------------------------------------------

_NEGATIONS = word_set(
    """
    not no never cannot can't won't don't doesn't didn't isn't aren't wasn't weren't shouldn't
    couldn't wouldn't hasn't haven't hadn't without none nothing neither nor
    """
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def negated(text: str) -> bool:
    """Polarity: an odd number of negating words ("cannot ... without" cancels out)."""
    words = re.findall(r"[a-z]+(?:['’][a-z]+)?", text.lower().replace("’", "'"))
    count = sum(w in _NEGATIONS or w.endswith("n't") for w in words)
    return count % 2 == 1


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


_CLAUSE = re.compile(r"\s*(?:;|:|,\s+(?:but|and|so|while|which|whereas)\b)\s*")


def evidence_units(hits: Sequence[Hit]) -> list[str]:
    """The passages' sentences, plus their clauses (so "X is not tuned, and Y is" yields a
    positive "Y is" as well as the negated whole)."""
    units: list[str] = []
    seen: set[str] = set()
    for candidate in _candidates(hits):
        parts = [candidate.text]
        clauses = [c.strip(" .") for c in _CLAUSE.split(candidate.text)]
        if len(clauses) > 1:
            parts += [c for c in clauses if len(c.split()) >= 3]
        for part in parts:
            if part not in seen:
                seen.add(part)
                units.append(part)
    return units


def check_support(generated_text: str, hits: Sequence[Hit], embed: Embedder) -> list[SentenceCheck]:
    """Each sentence of the model's text, marked supported when the cited passages back it.

    For every sentence: ``cosine`` is its best embedding similarity to a passage sentence
    or clause of the same polarity (both negated or both not); ``overlap`` the share of
    its content words found in the passages; the score is their weighted sum. It is
    supported when the score reaches SUPPORT_THRESHOLD. It *contradicts* the lesson when
    - its closest passage sentence has the opposite polarity, is close, and clearly beats
      every same-polarity one (CONTRADICTION_*): "4-bit is not usable for chat", or
    - one of its closest passage sentences (CLASH_*) gives another number in the same unit,
      the opposite word, or two names the other way round (``tutor.assistant.contradiction``).
    It is *not found* when it states a number the passages don't contain, scores below the
    threshold, or has no content words to check ("Yes, you can.").
    """
    said = sentences(generated_text)
    if not said:
        return []
    evidence = evidence_units(hits)
    if not evidence:
        return [SentenceCheck(clean(s), False, 0.0, "", "no passage") for s in said]
    passage_tokens = {t for unit in evidence for t in content_tokens(unit)}
    passage_numbers = {n for unit in evidence for n in _numbers(unit)}
    vectors = embed([*said, *evidence])
    said_vectors, evidence_vectors = vectors[: len(said)], vectors[len(said) :]
    polarity = np.array([negated(unit) for unit in evidence])
    checks = []
    for sentence, vector in zip(said, said_vectors, strict=True):
        tokens = content_tokens(sentence)
        if not tokens:
            checks.append(SentenceCheck(clean(sentence), False, 0.0, "", "nothing to check"))
            continue
        cosines = evidence_vectors @ vector
        closest = int(np.argmax(cosines))
        same = polarity == negated(sentence)
        if same.any():
            index = int(np.flatnonzero(same)[np.argmax(cosines[same])])
            cosine = float(cosines[index])
        else:
            index, cosine = closest, 0.0
        share = overlap(tokens, passage_tokens)
        score = max(0.0, min(1.0, SUPPORT_COSINE_WEIGHT * cosine + (1 - SUPPORT_COSINE_WEIGHT) * share))
        reason, contradicts = "", False
        clash = _clash(sentence, evidence, cosines)
        if (
            polarity[closest] != negated(sentence)
            and float(cosines[closest]) >= CONTRADICTION_MIN_COSINE
            and float(cosines[closest]) - cosine >= CONTRADICTION_MARGIN
        ):
            reason, index, contradicts = "the lesson says the opposite", closest, True
        elif clash is not None:
            (index, how), contradicts = clash, True
            reason = f"the lesson says otherwise ({how})"
        elif _numbers(sentence) - passage_numbers:
            reason = "states a number the lesson doesn't"
        elif score < SUPPORT_THRESHOLD:
            reason = "not close to any passage sentence"
        checks.append(
            SentenceCheck(clean(sentence), not reason, score, clean(evidence[index]), reason, contradicts)
        )
    return checks


def _clash(sentence: str, evidence: Sequence[str], cosines: np.ndarray) -> tuple[int, str] | None:
    """The closest passage sentences that say otherwise than ``sentence`` (another number in
    the same unit, the opposite word, two names swapped), with how; None when none does."""
    for index in np.argsort(-cosines)[:CLASH_NEIGHBOURS]:
        if float(cosines[index]) < CLASH_MIN_COSINE:
            break
        how = contradiction(sentence, evidence[int(index)])
        if how is not None:
            return int(index), how
    return None


# --- the whole answer ---------------------------------------------------------------


@dataclass
class Prepared:
    """Everything before the model runs: the search, the quote and the prompt (or a decline)."""

    question: str
    result: SearchResult
    lesson_id: str | None
    quote: Quote | None = None
    messages: Messages = field(default_factory=list)
    decline: str | None = None
    question_cut: bool = False

    @property
    def grounded(self) -> bool:
        return self.decline is None

    @property
    def citations(self) -> list[Citation]:
        return [Citation.from_hit(h) for h in self.result.hits]


def prepare(
    question: str,
    retriever: Retriever,
    lesson_id: str | None = None,
    k: int = 3,
    max_sentences: int = 3,
    style: PromptStyle = "user",
) -> Prepared:
    """Retrieve, pick the quote and build the prompt; decide whether to decline."""
    question, cut = limit_question(question)
    result = retriever.search(question, k=k, lesson_id=lesson_id)
    part = lesson_part(question) if lesson_id is not None else None
    if part is not None and lesson_id is not None:
        result = with_part(result, part_hit(retriever, lesson_id, part), k)
    prepared = Prepared(question, result, lesson_id, question_cut=cut)
    if not result.covered:
        prepared.decline = decline_message(result, lesson_id)
        return prepared
    # A question that names a lesson part is answered from that part (the first hit).
    quoted = result.hits[:1] if part is not None else result.hits
    prepared.quote = best_quote(question, quoted, retriever.embed, result.query_vector)
    prepared.messages = build_messages(question, result.hits, max_sentences, style)
    return prepared


def part_hit(retriever: Retriever, lesson_id: str, part: LessonPart) -> Hit:
    """The lesson part as one passage: the step asked for, or the whole part."""
    hits = retriever.section_hits(lesson_id, part.section)
    if part.index is not None and part.index < len(hits):
        return hits[part.index]
    return dataclasses.replace(hits[0], text="\n\n".join(h.text for h in hits))


def with_part(result: SearchResult, hit: Hit, k: int) -> SearchResult:
    """The search with the named part first: covered, whatever the similarity said."""
    rest = [h for h in (result.hits or result.closest) if h.section != hit.section][: k - 1]
    return dataclasses.replace(result, hits=[hit, *rest], closest=[hit, *rest], covered=True)


def finish(
    prepared: Prepared,
    generated: str,
    stats: AnswerStats,
    embed: Embedder,
    precision: str | None,
) -> TutorAnswer:
    """The answer once the model has written ``generated`` (or "" when no model ran) at
    ``precision``."""
    stats = dataclasses.replace(stats, retrieval_ms=round(prepared.result.elapsed_ms, 1))
    if not prepared.grounded:
        return TutorAnswer(
            question=prepared.question,
            answer=prepared.decline or DECLINE,
            grounded=False,
            precision=precision,
            stats=stats,
            see_also=[Citation.from_hit(h) for h in prepared.result.closest],
            lesson_id=prepared.lesson_id,
        )
    generated = clean(generated).strip()
    hits = prepared.result.hits
    return TutorAnswer(
        question=prepared.question,
        answer=prepared.quote.text if prepared.quote else "",
        grounded=True,
        generated=generated,
        precision=precision,
        citations=prepared.citations,
        sentences=check_support(generated, hits, embed) if generated else [],
        stats=stats,
        quote=prepared.quote,
        lesson_id=prepared.lesson_id,
    )


def answer(
    question: str,
    retriever: Retriever,
    generate: Generate | None,
    lesson_id: str | None = None,
    precision: str | None = None,
    k: int = 3,
    max_sentences: int = 3,
    style: PromptStyle = "user",
) -> TutorAnswer:
    """Retrieve, decline without calling ``generate`` when the lessons don't cover it,
    otherwise generate from the passages and check the result."""
    prepared = prepare(question, retriever, lesson_id, k, max_sentences, style)
    if not prepared.grounded or generate is None:
        return finish(prepared, "", AnswerStats(), retriever.embed, precision)
    text, stats = generate(prepared.messages)
    return finish(prepared, text, stats, retriever.embed, precision)
