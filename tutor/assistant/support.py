"""The support check: each sentence the model wrote, held against the lesson passages it was
given: supported, not found, or contradicting them (``tutor.assistant.contradiction`` finds
the clashes), with the passage sentence that decided it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tutor.assistant.contradiction import (
    contradiction,
    crossed,
    names,
    number_clash,
    quantities,
    recategorized,
    renamed,
    turned,
)
from tutor.assistant.embedder import Embedder
from tutor.assistant.hits import Hit
from tutor.assistant.quote import overlap, refers_back
from tutor.text import clean, content_tokens, sentences, word_set

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
# A sentence this close to its closest passage sentence, which does not say otherwise, is that
# sentence: the next one cannot contradict it ("Double quantization then quantizes those scales
# too, saving about 0.37 bits per weight", word for word, was ✗ against "… fits in 8 bits").
SAME_SENTENCE_COSINE = 0.95
# Raised whenever the same text can get another verdict: measurements that cached verdicts
# (the Lab's QA groundedness) name it in their keys. 2: clauses checked, another name;
# 3: the opposite degree; 4: a clause's clash needs shared words, a question is no claim;
# 5: turned round (an opposite word, names, negation), a value for another condition,
# "without" no longer negates a sentence, a clause before ", not"; 6: no number clash with a
# sentence about another format (its own or its section's), nor with a value said of another
# model size; two names swapped between clauses; "with no" negates no sentence; no amount read
# from a name's digits or with a stop word for its unit; a lesson sentence's neighbour does not
# contradict it; 7: a block size however written, a number the passages don't state held against
# any of their sentences about the same name, a name called another kind of thing; no opposite
# polarity when the clause nearest the lesson sentence has its polarity.
CHECK_VERSION = 7


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


# "without" is not among them: it negates its object, not the sentence ("it quantizes while it
# loads, without any calibration" says that it quantizes). Counted, it turned that true claim
# into ✗ against "it quantizes … as it loads"; left out, the tuning claims lost nothing. Nor is
# "no" after "with" ("as it loads, with no calibration"), for the same reason.
_NEGATIONS = word_set(
    """
    not no never cannot can't won't don't doesn't didn't isn't aren't wasn't weren't shouldn't
    couldn't wouldn't hasn't haven't hadn't none nothing neither nor
    """
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def negated(text: str) -> bool:
    """Polarity: an odd number of negating words ("it is not that it cannot" cancels out)."""
    words = re.findall(r"[a-z]+(?:['’][a-z]+)?", text.lower().replace("’", "'"))
    count = sum(
        (w in _NEGATIONS or w.endswith("n't")) and not (w == "no" and i and words[i - 1] == "with")
        for i, w in enumerate(words)
    )
    return count % 2 == 1


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


# Clauses: at ";", ":", ", but" and the like, and before ", not …" (so "AWQ protects salient
# channels by scaling, not by storing them in higher precision" also yields its positive half).
_CLAUSE = re.compile(r"\s*(?:;|:|,\s+(?:but|and|so|while|which|whereas)\b|,\s+(?=not\b))\s*")


def evidence_units(hits: Sequence[Hit]) -> list[str]:
    """The passages' sentences, plus their clauses (so "X is not tuned, and Y is" yields a
    positive "Y is" as well as the negated whole)."""
    return [text for text, _ in _units(hits)]


def _units(hits: Sequence[Hit]) -> list[tuple[str, str]]:
    """``evidence_units`` with the section each comes from: a sentence in the Q4_K_S section
    is about Q4_K_S when it does not name it."""
    units: list[tuple[str, str]] = []
    seen: set[str] = set()
    for candidate in _candidates(hits):
        parts = [candidate.text]
        clauses = [c.strip(" .") for c in _CLAUSE.split(candidate.text)]
        if len(clauses) > 1:
            parts += [c for c in clauses if len(c.split()) >= 3]
        for part in parts:
            if part not in seen:
                seen.add(part)
                units.append((part, candidate.hit.section))
    return units


def check_support(generated_text: str, hits: Sequence[Hit], embed: Embedder) -> list[SentenceCheck]:
    """Each sentence of the model's text, marked supported when the cited passages back it.

    For every sentence: ``cosine`` is its best embedding similarity to a passage sentence
    or clause of the same polarity (both negated or both not); ``overlap`` the share of
    its content words found in the passages; the score is their weighted sum. It is
    supported when the score reaches SUPPORT_THRESHOLD. It *contradicts* the lesson when
    - its closest passage sentence has the opposite polarity, is close, and clearly beats
      every same-polarity one (CONTRADICTION_*): "4-bit is not usable for chat", unless the
      sentence's clause nearest that passage sentence has its polarity (``_clause_agrees``), or
    - one of its closest passage sentences (CLASH_*) gives another number in the same unit,
      the opposite word, or two names the other way round (``tutor.assistant.contradiction``),
      or its clauses say of two names what the lesson says of each other (``crossed``), or
      it calls a name another kind of thing than the lesson does (``recategorized``), or
    - it states a number the passages don't, and one of their sentences about the same names
      gives another value for it (``_number_elsewhere``).
    It is *not found* when it states a number the passages don't contain, scores below the
    threshold, or has no content words to check ("Yes, you can.").
    """
    said = sentences(generated_text)
    if not said:
        return []
    units = _units(hits)
    evidence, sections = [text for text, _ in units], [section for _, section in units]
    if not evidence:
        return [SentenceCheck(clean(s), False, 0.0, "", "no passage") for s in said]
    passage_tokens = {t for unit in evidence for t in content_tokens(unit)}
    passage_numbers = {n for unit in evidence for n in _numbers(unit)}
    parts = [clauses(sentence) for sentence in said]
    flat = [clause for clauses_of in parts for clause in clauses_of]
    vectors = embed([*said, *flat, *evidence])
    said_vectors, evidence_vectors = vectors[: len(said)], vectors[len(said) + len(flat) :]
    clause_vectors = vectors[len(said) : len(said) + len(flat)]
    starts = np.cumsum([0, *(len(p) for p in parts)])  # each sentence's first clause's row
    polarity = np.array([negated(unit) for unit in evidence])
    checks = []
    for position, (sentence, vector) in enumerate(zip(said, said_vectors, strict=True)):
        tokens = content_tokens(sentence)
        if not tokens:
            checks.append(SentenceCheck(clean(sentence), False, 0.0, "", "nothing to check"))
            continue
        if sentence.rstrip().endswith("?"):  # the model echoing a question asserts nothing
            checks.append(SentenceCheck(clean(sentence), False, 0.0, "", "a question, not a claim"))
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
        own_clauses = clause_vectors[starts[position] : starts[position + 1]]
        new_numbers = _numbers(sentence) - passage_numbers  # stated, and not in the passages
        clash = _clash(sentence, evidence, sections, cosines)
        if clash is None and (found := turned(sentence, evidence)) is not None:
            # Asked of every passage unit: a word-for-word match needs no closeness in meaning,
            # and a long lesson sentence is far in meaning from a short claim.
            clash = found[0], f"turned round: {found[1]}"
        if clash is None and (found := recategorized(sentence, evidence)) is not None:
            clash = found[0], f"another kind of thing: {found[1]}"
        if (
            polarity[closest] != negated(sentence)
            and float(cosines[closest]) >= CONTRADICTION_MIN_COSINE
            and float(cosines[closest]) - cosine >= CONTRADICTION_MARGIN
            and not _clause_agrees(
                parts[position], own_clauses, evidence_vectors[closest], bool(polarity[closest])
            )
        ):
            reason, index, contradicts = "the lesson says the opposite", closest, True
        elif (
            otherwise := clash
            or _clause_clash(parts[position], own_clauses, evidence, sections, evidence_vectors)
            or crossed(parts[position], evidence)
            or (_number_elsewhere(sentence, evidence, sections) if new_numbers else None)
        ) is not None:
            (index, how), contradicts = otherwise, True
            reason = f"the lesson says otherwise ({how})"
        elif new_numbers:
            reason = "states a number the lesson doesn't"
        elif score < SUPPORT_THRESHOLD:
            reason = "not close to any passage sentence"
        checks.append(
            SentenceCheck(clean(sentence), not reason, score, clean(evidence[index]), reason, contradicts)
        )
    return checks


def clauses(sentence: str) -> list[str]:
    """A sentence's clauses (as ``evidence_units`` splits the passages'), when it has more than
    one of at least three words: a run-on sentence can carry a wrong clause ("…; int8 hits
    noticeable quality cliffs; …") that the whole, close to a passage, hides. Else []."""
    parts = [c.strip(" .") for c in _CLAUSE.split(sentence)]
    parts = [c for c in parts if len(c.split()) >= 3]
    return parts if len(parts) > 1 else []


def _clause_agrees(
    parts: Sequence[str], vectors: np.ndarray, unit_vector: np.ndarray, unit_negated: bool
) -> bool:
    """Whether the clause of a sentence closest to a passage unit has that unit's polarity: the
    whole sentence's negation is then another clause's ("LLM.int8() uses mixed-precision
    decomposition; … reported no measurable quality loss" against "LLM.int8() uses
    mixed-precision decomposition."), not the opposite of what the unit says. Not when another,
    negated clause points back at it ("BF16 has the same range as FP32; that is not true"), nor
    for a sentence of one clause."""
    if not len(parts):
        return False
    nearest = int(np.argmax(vectors @ unit_vector))
    if any(negated(p) and refers_back(p) for i, p in enumerate(parts) if i != nearest):
        return False
    return negated(parts[nearest]) == unit_negated


# A clause and the passage unit it clashes with share at least this many content words besides
# numbers and their units: a short clause is close in meaning to many short units ("avoid going
# below about 4 bits" to "5 and 6 bits are very close"), few of which are about the same thing.
CLAUSE_SHARED_WORDS = 2


def _clause_clash(
    parts: Sequence[str],
    vectors: np.ndarray,
    evidence: Sequence[str],
    sections: Sequence[str],
    evidence_vectors: np.ndarray,
) -> tuple[int, str] | None:
    """The first of a sentence's clauses (``vectors``: theirs) that clashes with a passage
    sentence about the same thing (``_clash``, ``CLAUSE_SHARED_WORDS``), with the clause quoted
    in how; None when none does."""
    for clause, vector in zip(parts, vectors, strict=True):
        clash = _clash(clause, evidence, sections, evidence_vectors @ vector)
        if (
            clash is not None
            and len(_topic_words(clause) & _topic_words(evidence[clash[0]])) >= CLAUSE_SHARED_WORDS
        ):
            return clash[0], f"{clash[1]}, in “{clause}”"
    return None


def _number_elsewhere(
    sentence: str, evidence: Sequence[str], sections: Sequence[str]
) -> tuple[int, str] | None:
    """A passage unit anywhere in the passages, not only among the closest, that gives another
    value for a number the sentence states and the passages don't: about the same names (the
    sentence's formats and methods, in the unit or its section) and sharing
    CLAUSE_SHARED_WORDS topic words. A long lesson sentence with a formula ("That works out to
    (32 × 8 + 16) ÷ 32 = 8.5 bits per weight") is far in meaning from "Q8_0 works out to 9.5
    bits per weight"."""
    named = set(names(sentence))
    topic = _topic_words(sentence)
    for index, (unit, section) in enumerate(zip(evidence, sections, strict=True)):
        if named and not named & set(names(f"{unit} {section}")):
            continue
        if len(topic & _topic_words(unit)) < CLAUSE_SHARED_WORDS:
            continue
        if (how := number_clash(sentence, unit, section)) is not None:
            return index, f"a different number: {how}"
    return None


def _topic_words(text: str) -> set[str]:
    """Content words that are neither numbers nor the units after them."""
    units = set(quantities(text))
    return {t for t in content_tokens(text) if not t[0].isdigit() and t.rstrip("s") not in units}


def _clash(
    sentence: str, evidence: Sequence[str], sections: Sequence[str], cosines: np.ndarray
) -> tuple[int, str] | None:
    """The closest passage sentences (from ``sections``) that say otherwise than ``sentence``
    (another number in the same unit, the opposite word, two names swapped), with how; None
    when none does."""
    order = np.argsort(-cosines)
    for index in order[:CLASH_NEIGHBOURS]:
        if float(cosines[index]) < CLASH_MIN_COSINE:
            break
        how = contradiction(sentence, evidence[int(index)], sections[int(index)])
        if how is not None:
            return int(index), how
        if float(cosines[index]) >= SAME_SENTENCE_COSINE:
            break
    # Another name only against the closest: where the lesson says the same of the sentence's
    # own name, that sentence is the closest, and a parallel one about another name comes next.
    closest = int(order[0])
    if float(cosines[closest]) >= CLASH_MIN_COSINE and (how := renamed(sentence, evidence[closest])):
        return closest, f"another name: {how}"
    return None


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
