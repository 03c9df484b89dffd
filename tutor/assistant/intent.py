"""What a question asks for, from its wording: the kind of answer, and whether it is about
one of the lesson's own parts (its premise, summary, key terms or practice steps).

Retrieval by meaning finds the body's sections well, but "what's the gist?" or "what's step
two?" share no meaning with the premise or the second step's text: those questions name the
part, and the part is what answers them. Broad questions ("why bother quantizing?", "what's
the trade-off?") are answered by the premise, the lesson's own one-line case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tutor.assistant.chunks import KEY_TERMS, PRACTICE, PREMISE, SUMMARY

QuestionType = Literal["why", "how_much", "which", "define", "how", "yes_no", "other"]


def question_type(question: str) -> QuestionType:
    """What kind of answer the question asks for, from its wording."""
    q = " ".join(question.casefold().split())
    if re.search(r"\bwhy\b|\bwhat for\b|\bwhat's the point\b|\breason\b", q):
        return "why"
    if re.search(r"\bhow (?:much|many|big|large|small|fast|slow|long)\b|\bwhat size\b", q):
        return "how_much"
    if re.search(r"\bwhich\b|\bshould i (?:use|pick|choose|grab|get)\b|\bor\b.*\?$|\bbetter\b|\bbest\b", q):
        return "which"
    if re.search(
        r"^(?:so )?(?:what(?:'s| is| are| does)|define|explain|meaning of)\b|\bstand for\b|\bmean\b", q
    ):
        return "define"
    if re.search(r"\bhow (?:do|does|can|to|is|are)\b", q):
        return "how"
    if re.match(r"(?:so )?(?:is|are|can|could|does|do|did|will|would|should|has|have)\b", q):
        return "yes_no"
    return "other"


_SUMMARY = re.compile(
    r"\b(?:summar(?:y|ise|ize)|sum (?:it |this |that )?up|tl;?dr|"
    r"in (?:short|brief|a nutshell|one line|a sentence)|"
    r"what(?:'s| is) (?:this|the) lesson (?:about|for)|lesson about|in one line)\b"
)
_PREMISE = re.compile(
    r"\b(?:premise|main (?:idea|point|message|takeaway|lesson)|big (?:idea|takeaway|picture)|key takeaway|"
    r"takeaways?|gist|core (?:message|idea|point)|bottom line|"
    r"why (?:bother|would (?:i|you|anyone)|should (?:i|you))(?: \w+)? (?:quantiz|use quantiz|care)|"
    r"trade-?offs?|the catch)"
)
_KEY_TERMS = re.compile(r"\b(?:key terms?|glossary|vocabulary|terms? (?:should|do|must) i know|jargon)\b")
# A step named by its title in quotes counts too: 'the "estimate before you download" step'.
_PRACTICE = re.compile(
    r"\b(?:practi[cs]e|exercises?|step (?:one|two|three|four|\d))\b|[\"'“‘][^\"'“”‘]{3,}[\"'”’] step\b"
)
# "last" and "final" count from the end (index 0: one before the first).
_ORDINALS = {
    "one": 1,
    "first": 1,
    "two": 2,
    "second": 2,
    "three": 3,
    "third": 3,
    "four": 4,
    "fourth": 4,
    "last": 0,
    "final": 0,
}
_STEP = re.compile(
    r"\b(?:step (\d|one|two|three|four)|(first|second|third|fourth|last|final) (?:step|exercise|practice))\b"
)


@dataclass(frozen=True)
class LessonPart:
    section: str  # one of tutor.assistant.chunks.FRONT_MATTER
    index: int | None = None  # the practice step asked for (0-based, -1 the last), when one is named


def lesson_part(question: str) -> LessonPart | None:
    """The part of the lesson the question asks about by name, or None."""
    q = " ".join(question.casefold().replace("’", "'").split())
    if _PRACTICE.search(q):
        step = _STEP.search(q)
        if step:
            word = step.group(1) or step.group(2)
            return LessonPart(PRACTICE, (int(word) if word.isdigit() else _ORDINALS[word]) - 1)
        return LessonPart(PRACTICE, 0 if re.search(r"\bfirst\b", q) else None)
    if _KEY_TERMS.search(q):
        return LessonPart(KEY_TERMS)
    if _SUMMARY.search(q):
        return LessonPart(SUMMARY)
    if _PREMISE.search(q):
        return LessonPart(PREMISE)
    return None
