"""How well the tutor finds, quotes and checks: figures on an evaluation set.

Two sets ship with the lessons: ``eval_questions.yaml``, the one the retrieval and support
constants were tuned on, and ``eval_heldout.yaml``, written from the lessons alone before any
of issue 10's tuning and never tuned on. Both hold on-lesson questions (with the section that
answers them; the held-out set also names the key fact a good quote contains), off-topic
questions, and claims to check against one section.

Everything here runs without the language model: retrieval, the quote and the support check
on the claims. What the model writes is scored by ``tutor.lab.cliff`` and ``quant-tutor eval
--generate``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tutor.assistant.grounding import prepare, quotable_texts
from tutor.assistant.support import MARKS, Verdict, check_support
from tutor.library.content import default_content_dir

if TYPE_CHECKING:  # pragma: no cover
    from tutor.assistant.retrieval import Retriever

VERDICTS: tuple[Verdict, ...] = tuple(MARKS)
SETS = {"tuning": "eval_questions.yaml", "heldout": "eval_heldout.yaml"}


class EvalSetError(ValueError):
    """An evaluation file that is missing a field or names a section no lesson has."""


@dataclass(frozen=True)
class OnLesson:
    lesson: str
    section: str
    question: str
    also: tuple[tuple[str, str], ...] = ()
    key_fact: tuple[str, ...] = ()

    @property
    def golds(self) -> set[tuple[str, str]]:
        return {(self.lesson, self.section), *self.also}


@dataclass(frozen=True)
class Claim:
    lesson: str
    section: str
    text: str
    verdict: Verdict
    kind: str = ""  # how a contradiction contradicts: negation, antonym, number, swapped_roles


@dataclass(frozen=True)
class EvalSet:
    name: str
    on_lesson: tuple[OnLesson, ...]
    off_topic: tuple[str, ...]
    claims: tuple[Claim, ...]


def set_path(name: str) -> Path:
    """A shipped set by name (``tuning``, ``heldout``), or any file by path."""
    if name in SETS:
        return default_content_dir() / SETS[name]
    return Path(name)


def load_eval_set(name: str) -> EvalSet:
    """Read an evaluation file; both layouts (``supported: true`` or ``verdict:``) are accepted."""
    path = set_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise EvalSetError(f"{path}: cannot read the evaluation set ({exc})") from exc
    if not isinstance(data, dict):
        raise EvalSetError(f"{path}: expected a mapping with on_lesson, off_topic and claims")

    def field_of(item: Any, key: str, where: str) -> Any:
        if not isinstance(item, dict) or key not in item:
            raise EvalSetError(f"{path}: {where} has no {key!r}")
        return item[key]

    on_lesson = []
    for number, item in enumerate(data.get("on_lesson") or [], 1):
        where = f"on_lesson item {number}"
        also = tuple(
            (field_of(g, "lesson", where), field_of(g, "section", where)) for g in item.get("also", [])
        )
        on_lesson.append(
            OnLesson(
                str(field_of(item, "lesson", where)),
                str(field_of(item, "section", where)),
                str(field_of(item, "question", where)),
                also,
                tuple(str(k) for k in item.get("key_fact", [])),
            )
        )
    claims = []
    for number, item in enumerate(data.get("claims") or [], 1):
        where = f"claim {number}"
        if "verdict" in item:
            verdict = item["verdict"]
            if verdict not in VERDICTS:
                raise EvalSetError(
                    f"{path}: {where} has verdict {verdict!r}; use one of {', '.join(VERDICTS)}"
                )
        else:
            verdict = "supported" if field_of(item, "supported", where) else "not_found"
        text = item.get("claim", item.get("text"))
        if not text:
            raise EvalSetError(f"{path}: {where} has no 'claim' text")
        claims.append(
            Claim(
                str(field_of(item, "lesson", where)),
                str(field_of(item, "section", where)),
                str(text),
                verdict,
                str(item.get("kind", "")),
            )
        )
    return EvalSet(
        path.stem, tuple(on_lesson), tuple(str(q) for q in data.get("off_topic") or []), tuple(claims)
    )


# --- figures ----------------------------------------------------------------------------


def _normal(text: str) -> str:
    """Case, emphasis marks, curly quotes and spacing aside: how a key fact is looked for."""
    text = text.casefold().replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    return " ".join(re.sub(r"[*`]", "", text).split())


def contains_key_fact(quote: str, key_fact: Sequence[str]) -> bool:
    """Whether the quote holds every phrase of the key fact."""
    said = _normal(quote)
    return all(_normal(phrase) in said for phrase in key_fact)


def share(part: int, whole: int) -> float | None:
    """``part / whole`` to three places; None when there is nothing to divide."""
    return round(part / whole, 3) if whole else None


def show(value: float | None, digits: str = ".3f") -> str:
    return "—" if value is None else format(value, digits)


@dataclass
class Figures:
    name: str
    on_lesson: int = 0
    hits: int = 0  # a gold section among the top 3, asked from the question's lesson
    wrongly_declined: int = 0
    with_key_fact: int = 0  # questions that name a key fact
    key_fact_quoted: int = 0
    off_topic: int = 0
    declined: int = 0
    # claims: confusion[expected][got]
    confusion: dict[str, dict[str, int]] = field(
        default_factory=lambda: {v: dict.fromkeys(VERDICTS, 0) for v in VERDICTS}
    )
    misses: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    unquoted: list[str] = field(default_factory=list)
    wrong_claims: list[str] = field(default_factory=list)

    @property
    def hit_at_3(self) -> float | None:
        return share(self.hits, self.on_lesson)

    @property
    def wrongly_declined_share(self) -> float | None:
        return share(self.wrongly_declined, self.on_lesson)

    @property
    def off_topic_declined(self) -> float | None:
        return share(self.declined, self.off_topic)

    @property
    def key_fact_share(self) -> float | None:
        return share(self.key_fact_quoted, self.with_key_fact)

    def recall(self, verdict: Verdict) -> float | None:
        """Of the claims whose true verdict is ``verdict``, the share the check gave it."""
        row = self.confusion[verdict]
        return share(row[verdict], sum(row.values()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.name,
            "on_lesson": self.on_lesson,
            "off_topic": self.off_topic,
            "claims": sum(sum(row.values()) for row in self.confusion.values()),
            "hit_at_3": self.hit_at_3,
            "off_topic_declined": self.off_topic_declined,
            "on_topic_wrongly_declined": self.wrongly_declined_share,
            "key_fact_quoted": self.key_fact_share,
            "claims_recall": {v: self.recall(v) for v in VERDICTS},
            "confusion": self.confusion,
        }

    def report(self) -> str:

        claims = sum(sum(row.values()) for row in self.confusion.values())
        lines = [
            f"{self.name}: {self.on_lesson} on-lesson questions, {self.off_topic} off-topic, {claims} claims",
            f"  retrieval hit@3 (asked from the lesson)   {show(self.hit_at_3)}",
            f"  off-topic declined                        {show(self.off_topic_declined)}",
            f"  on-topic wrongly declined                 {show(self.wrongly_declined_share)}",
            f"  quote holds the key fact                  {show(self.key_fact_share)}"
            + (f"  ({self.key_fact_quoted}/{self.with_key_fact})" if self.with_key_fact else ""),
        ]
        for verdict in VERDICTS:
            row = self.confusion[verdict]
            if sum(row.values()):
                got = ", ".join(f"{v} {n}" for v, n in row.items() if n)
                lines.append(
                    f"  claims that are {verdict:<12} recall {show(self.recall(verdict))}  (checked: {got})"
                )
        return "\n".join(lines)

    def details(self) -> str:
        parts = [
            ("retrieval misses or wrong declines", self.misses),
            ("off-topic answered", self.leaks),
            ("quotes without the key fact", self.unquoted),
            ("claims judged wrongly", self.wrong_claims),
        ]
        return "\n".join(
            f"  {title}:\n" + "\n".join(f"    - {x}" for x in items) for title, items in parts if items
        )


def evaluate(retriever: Retriever, eval_set: EvalSet) -> Figures:
    """Retrieval, the quote and the claims' verdicts on one set (no language model)."""
    figures = Figures(eval_set.name)
    _embed_up_front(retriever, eval_set)
    for item in eval_set.on_lesson:
        figures.on_lesson += 1
        prepared = prepare(item.question, retriever, item.lesson)
        found = {(h.lesson_id, h.section) for h in prepared.result.closest}
        figures.hits += bool(item.golds & found)
        figures.wrongly_declined += not prepared.grounded
        if not item.golds & found or not prepared.grounded:
            figures.misses.append(
                f"{item.question}  (wanted {item.section}; got {sorted(s for _, s in found)})"
            )
        if item.key_fact:
            figures.with_key_fact += 1
            quote = prepared.quote.text if prepared.quote else ""
            if contains_key_fact(quote, item.key_fact):
                figures.key_fact_quoted += 1
            else:
                figures.unquoted.append(f"{item.question}  → {quote or '(declined)'}")
    for question in eval_set.off_topic:
        figures.off_topic += 1
        covered = retriever.search(question).covered
        figures.declined += not covered
        if covered:
            figures.leaks.append(question)
    for claim in eval_set.claims:
        [check] = check_support(
            claim.text, retriever.section_hits(claim.lesson, claim.section), retriever.embed
        )
        figures.confusion[claim.verdict][check.verdict] += 1
        if check.verdict != claim.verdict:
            figures.wrong_claims.append(
                f"{claim.text}  (is {claim.verdict}, checked {check.verdict}: {check.reason or 'close'};"
                f" against: {check.evidence})"
            )
    return figures


def _embed_up_front(retriever: Retriever, eval_set: EvalSet) -> None:
    """Embed, in one call, the texts :func:`evaluate` will compare: the set's questions and
    claims, and every quotable span and evidence unit of the lessons it names.

    The tutor embeds a handful of texts per question; in large length-sorted batches the same
    texts take about a third of the time on a CPU, and the retriever remembers them.
    """
    lessons = [item.lesson for item in eval_set.on_lesson] + [claim.lesson for claim in eval_set.claims]
    texts = [item.question for item in eval_set.on_lesson] + list(eval_set.off_topic)
    texts += [claim.text for claim in eval_set.claims] + quotable_texts(retriever, lessons)
    retriever.embed(sorted(set(texts), key=len))


# --- what the model writes, per precision -------------------------------------------------


@dataclass
class AnswerFigures:
    """The model's answers at one precision to the same questions: how its sentences check."""

    precision: str
    alpha: float = 0.0  # context-aware decoding's alpha (0: plain)
    answer_first: bool = False  # the model continued after the quote
    answers: int = 0
    sentences: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    key_fact_said: int = 0  # answers whose generated text holds the question's key fact
    decode_tok_s: list[float] = field(default_factory=list)

    @property
    def opening(self) -> str:
        return "quote" if self.answer_first else "plain"

    def verdict_share(self, verdict: Verdict) -> float | None:
        return share(self.verdicts[verdict], self.sentences)

    def as_dict(self) -> dict[str, Any]:
        speeds = sorted(self.decode_tok_s)
        return {
            "precision": self.precision,
            "alpha": self.alpha,
            "opening": self.opening,
            "answers": self.answers,
            "sentences": self.sentences,
            **{f"{v}_share": self.verdict_share(v) for v in VERDICTS},
            "key_fact_said": share(self.key_fact_said, self.answers),
            "median_decode_tok_s": speeds[len(speeds) // 2] if speeds else None,
        }


def spread(items: Sequence[OnLesson], count: int) -> list[OnLesson]:
    """``count`` questions spread evenly over the set (every lesson, not only the first)."""
    step = max(1, len(items) // max(1, count))
    return list(items[::step][:count])


def evaluate_answers(
    engine: Any,
    retriever: Retriever,
    eval_set: EvalSet,
    precisions: Sequence[str],
    count: int,
    alphas: Sequence[float] | None = None,
    openings: Sequence[bool] | None = None,
) -> list[AnswerFigures]:
    """Ask ``count`` of the set's on-lesson questions at each precision (and each context-aware
    decoding alpha, each opening: plain or answer-first) and check every answer."""
    from tutor.assistant.tutor_chat import ANSWER_FIRST, CAD_ALPHA, ask

    questions = spread(eval_set.on_lesson, count)
    rows = []
    for precision in precisions:
        engine.switch(precision, wait=True)
        for alpha, first in ((a, f) for a in (alphas or [CAD_ALPHA]) for f in (openings or [ANSWER_FIRST])):
            row = AnswerFigures(precision, alpha, first)
            for item in questions:
                answer = ask(item.question, retriever, engine, item.lesson, alpha=alpha, answer_first=first)
                if not answer.grounded:
                    continue
                row.answers += 1
                row.sentences += len(answer.sentences)
                for check in answer.sentences:
                    row.verdicts[check.verdict] += 1
                said = answer.generated
                row.key_fact_said += bool(item.key_fact) and contains_key_fact(said, item.key_fact)
                if answer.stats.tokens_per_s:
                    row.decode_tok_s.append(answer.stats.tokens_per_s)
            rows.append(row)
    return rows


def answers_table(name: str, rows: Sequence[AnswerFigures]) -> str:
    lines = [
        f"{name}: the model's answers, checked sentence by sentence",
        f"  {'precision':<10}{'alpha':>6}{'opens':>7}{'answers':>8}{'sentences':>10}{'✓ supported':>13}"
        f"{'? not found':>13}{'✗ contradicts':>15}{'key fact said':>15}{'decode tok/s':>14}",
    ]
    for row in rows:
        d = row.as_dict()
        lines.append(
            f"  {row.precision:<10}{row.alpha:>6.2g}{row.opening:>7}{row.answers:>8}{row.sentences:>10}"
            f"{show(d['supported_share'], '.2f'):>13}{show(d['not_found_share'], '.2f'):>13}"
            f"{show(d['contradicts_share'], '.2f'):>15}{show(d['key_fact_said'], '.2f'):>15}"
            f"{show(d['median_decode_tok_s'], '.1f'):>14}"
        )
    return "\n".join(lines)
