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
   (:func:`tutor.assistant.support.check_support`): supported, not found in the lesson, or
   contradicting it.

Nothing here imports the model engine: ``generate`` is any callable from chat
messages to ``(text, stats)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tutor.assistant.answer_stats import AnswerStats
from tutor.assistant.chunks import PRACTICE, PREMISE, SUMMARY
from tutor.assistant.embedder import Embedder
from tutor.assistant.hits import Hit, SearchResult
from tutor.assistant.intent import LessonPart, lesson_part
from tutor.assistant.quote import Quote, best_quote, spans
from tutor.assistant.support import SentenceCheck, check_support, evidence_units
from tutor.text import clean, content_tokens, sentences

if TYPE_CHECKING:  # pragma: no cover
    from tutor.assistant.retrieval import Retriever

Messages = list[dict[str, str]]
Generate = Callable[[Messages], tuple[str, AnswerStats]]

DECLINE = "The lesson doesn't cover that."
# The lesson's two overviews: a question naming one gets the other as its second passage.
OVERVIEWS = (PREMISE, SUMMARY)
# Words that name the practice part itself, not what a step is about.
_PART_WORDS = frozenset({"practice", "practise", "exercise", "exercises", "step", "steps", "lesson", "task"})
MAX_QUESTION_CHARS = 500
# The prompt's passages stay under this many tokens (estimated at 4 characters a token),
# so the prompt fits SmolLM2-135M's small context with room for the answer.
PASSAGE_TOKEN_BUDGET = 700
CHARS_PER_TOKEN = 4
# What the contrast prompt of context-aware decoding has under "Passages:" (contrast_messages).
NO_PASSAGES = "(none)"
# Raised whenever the prompts change: measurements that cached the model's answers (the Lab's
# QA) name it in their keys. 2: the contrast prompt keeps the "Passages:" label; 3: passages
# are not named by section.
PROMPT_VERSION = 3

# --- results ------------------------------------------------------------------------


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
    """The passages, numbered, together under ``token_budget``. Not named by section: with
    context-aware decoding a name was echoed as the answer's opening ("LLM.int8(): keeping the
    outliers: …"), at nf4 in 17 of 40 answers; without names, 3 (and 0.60 → 0.72 of the
    sentences supported)."""
    lines = []
    remaining = token_budget * CHARS_PER_TOKEN
    for number, hit in enumerate(hits, 1):
        share = remaining // (len(hits) - number + 1)
        prose = " ".join(sentences(hit.text))
        text = _cut(prose, max(share, 80))
        remaining -= len(text)
        lines.append(f"[{number}] {text}")
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
    decoding (the rules and the question, nothing to ground them). The "Passages:" label stays,
    with NO_PASSAGES under it: taken out with the passages, the label itself was boosted, and
    nf4 opened 19 of 40 answers with "Passages: …" (none with it kept)."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] == "user" and "\n\nQuestion: " in content:
            content = f"Passages:\n{NO_PASSAGES}\n\nQuestion: " + content.split("\n\nQuestion: ", 1)[1]
        elif message["role"] == "system" and "\n\nPassages:\n" in content:
            content = content.split("\n\nPassages:\n", 1)[0] + f"\n\nPassages:\n{NO_PASSAGES}"
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
    """ "The lesson doesn't cover that." plus the field elsewhere the question reads as, if any,
    and where the lessons come closest."""
    closest = result.closest[:max_sections]
    said = f"{DECLINE} It reads as a question about {result.elsewhere}." if result.elsewhere else DECLINE
    if not closest:
        return said
    named = [f"“{h.section}” ({h.lesson_title})" for h in closest]
    text = f"{said} The closest sections are {' and '.join(named)}."
    if lesson_id is not None and closest[0].lesson_id != lesson_id:
        text += f" The related lesson “{closest[0].lesson_title}” comes closest."
    return clean(text)


# --- the whole answer ---------------------------------------------------------------


@dataclass
class PreparedAnswer:
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
) -> PreparedAnswer:
    """Retrieve, pick the quote and build the prompt; decide whether to decline."""
    question, cut = limit_question(question)
    result = retriever.search(question, k=k, lesson_id=lesson_id)
    part = lesson_part(question) if lesson_id is not None else None
    if part is not None and lesson_id is not None:
        result = with_parts(result, named_parts(retriever, lesson_id, part, question), k)
    prepared = PreparedAnswer(question, result, lesson_id, question_cut=cut)
    if not result.covered:
        prepared.decline = decline_message(result, lesson_id)
        return prepared
    # A question that names a lesson part is answered from that part (the first hit).
    quoted = result.hits[:1] if part is not None else result.hits
    prepared.quote = best_quote(
        question, quoted, retriever.embed, result.query_vector, whole_part=part is not None
    )
    prepared.messages = build_messages(question, result.hits, max_sentences, style)
    return prepared


def quotable_texts(retriever: Retriever, lesson_ids: Sequence[str]) -> list[str]:
    """Every text of these lessons that a quote or a support check embeds: each section's
    quotable spans and evidence units, once each, shortest first (length-sorted batches pad
    least)."""
    wanted = set(lesson_ids)
    sections = dict.fromkeys((c.lesson_id, c.section) for c in retriever.chunks if c.lesson_id in wanted)
    texts: set[str] = set()
    for lesson_id, section in sections:
        hits = retriever.section_hits(lesson_id, section)
        texts.update(span.text for span in spans(hits))
        texts.update(evidence_units(hits))
    return sorted(texts, key=len)


def part_hit(retriever: Retriever, lesson_id: str, part: LessonPart, question: str = "") -> Hit:
    """The lesson part as one passage: the step asked for (by number, or as the one step whose
    words the question shares most: "the memory math exercise"), or the whole part."""
    hits = retriever.section_hits(lesson_id, part.section)
    if part.index is not None and part.index < len(hits):
        return hits[part.index]
    if part.section == PRACTICE and len(hits) > 1:
        asked = set(content_tokens(question)) - _PART_WORDS
        shared = [len(asked & set(content_tokens(h.text))) for h in hits]
        if max(shared) > 0 and shared.count(max(shared)) == 1:
            return hits[shared.index(max(shared))]
    return dataclasses.replace(hits[0], text="\n\n".join(h.text for h in hits))


def named_parts(retriever: Retriever, lesson_id: str, part: LessonPart, question: str = "") -> list[Hit]:
    """The part a question names, as passages: the part, and for one of the lesson's two
    overviews (its premise and its summary, each the whole case in a line) the other as well,
    since "the gist" or "the core message" is either."""
    hits = [part_hit(retriever, lesson_id, part, question)]
    if part.section in OVERVIEWS:
        other = next(section for section in OVERVIEWS if section != part.section)
        if retriever.section_hits(lesson_id, other):
            hits.append(part_hit(retriever, lesson_id, LessonPart(other)))
    return hits


def with_parts(result: SearchResult, named: Sequence[Hit], k: int) -> SearchResult:
    """The search with the named parts first: covered, whatever the similarity said."""
    sections = {hit.section for hit in named}
    rest = [h for h in (result.hits or result.closest) if h.section not in sections]
    hits = [*named, *rest][:k]
    return dataclasses.replace(result, hits=hits, closest=hits, covered=True)


def finish(
    prepared: PreparedAnswer,
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
