"""Whether a sentence says the opposite of a close lesson sentence, and how.

The support check (``tutor.assistant.support.check_support``) asks this of the passage sentences that
are close to a generated sentence in meaning; a sentence that is close *and* differs in one of
these ways contradicts the lesson rather than merely being absent from it:

- an antonym: "a higher number is better" against "lower is better";
- a number: "about 28 GB" against "about 7 GB" (the same unit, a different value), unless
  the two are about different formats ("in FP16 … 14 GB" against FP32's row); a block size is
  one unit however it is written ("blocks of 128" against "64 weights per block");
- swapped roles: "FP4 usually preserves quality better than NF4" against the reverse;
- the opposite degree: "Q8_0 loses a lot of quality" against "practically the same quality";
- another name (``renamed``, asked of the closest lesson sentence only): the lesson's sentence
  about Q8_0 said of Q5_K_S;
- crossed (``crossed``, asked of a sentence's clauses): "AWQ quantizes column by column, while
  GPTQ scales the salient channels up", each clause what the lesson says of the other name;
- another kind of thing (``recategorized``, asked of every lesson sentence): "GGUF is a
  quantization method" against "GGUF is a file format";
- turned round (``turned``, asked of every lesson sentence, since it needs no closeness in
  meaning): the sentence with one word made its opposite, a negation taken out or put in, or
  two names exchanged, reads word for word as the lesson does where the sentence as written
  does not ("quantizes the least important columns first" against "... the most important
  columns first").

Negation ("can" against "cannot") in a close sentence is judged by polarity in
``tutor.assistant.support``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tutor.text import STOPWORDS, content_tokens

# Pairs of words that say opposite things about the same subject. Kept small and specific to
# the lessons' claims; each pair works both ways.
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("lossless", "lossy"),
    ("faster", "slower"),
    ("fast", "slow"),
    ("more", "less"),
    ("more", "fewer"),
    ("smaller", "larger"),
    ("smaller", "bigger"),
    ("small", "large"),
    ("better", "worse"),
    ("best", "worst"),
    ("higher", "lower"),
    ("high", "low"),
    ("increase", "decrease"),
    ("increases", "decreases"),
    ("gains", "loses"),
    ("keep", "lose"),
    ("keeps", "loses"),
    ("easier", "harder"),
    ("cheaper", "costlier"),
    ("above", "below"),
    ("most", "least"),
    ("before", "after"),
    ("tolerate", "suffer"),
    ("up", "down"),
    ("multiplies", "divides"),
    ("multiplied", "divided"),
    ("finer", "coarser"),
    ("rises", "falls"),
    ("rise", "fall"),
)
_OPPOSITE: dict[str, set[str]] = {}
for _a, _b in ANTONYMS:
    _OPPOSITE.setdefault(_a, set()).add(_b)
    _OPPOSITE.setdefault(_b, set()).add(_a)

_WORD = re.compile(r"[a-z]+")
# A number with the unit or noun after it: "7 GB", "4 bits", "8.5 bits", "1,024 samples".
# Not a number inside a name ("Q8_0", "NF4"), and a range's first value takes the unit after
# the second ("4 to 5 bits": both bits).
_QUANTITY = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)(?:\s*(?:to|-|–)\s*(\d+(?:[.,]\d+)*))?\s*(%|[a-zA-Z]+)")
# Names whose order carries a claim: quant types and formats (NF4, Q4_K_M, int8, LLM.int8()),
# model sizes (8B, 70B) and capitalised method names (AWQ, GPTQ).
# A number format or quant type: "FP16", "Q4_K_M", "int8", "NF4".
_FORMAT = r"[A-Za-z]+\d+[A-Za-z0-9_]*"
_NAME = re.compile(
    rf"\b(?:{_FORMAT}|\d+(?:\.\d+)?B|[A-Z]{{2,}}[A-Za-z0-9]*|(?i:smaller|bigger|larger|small|large|big)"
    r" (?:models?|ones?))\b"
)


# How much quality a sentence says is lost: a lot, or practically none. One side saying a lot
# and the other practically none is the opposite claim, in degree rather than in one word.
_MUCH_LOST = re.compile(
    r"\b(?:los(?:es|e|ing|t)|hurts?|damages?|degrades?)\b[^.;]{0,24}?"
    r"\b(?:a lot|much|significantly|badly|heavily|greatly)\b|"
    r"\b(?:a lot of|significant|major|heavy|large|big)\s+(?:quality\s+)?loss(?:es)?\b",
    re.IGNORECASE,
)
_NOTHING_LOST = re.compile(
    r"\b(?:practically|nearly|almost|virtually) (?:the same|identical|lossless)\b|\bnear-lossless\b|"
    r"\bhard to tell apart\b|\bnegligible\b|\bwithin measurement noise\b|\bindistinguishable\b",
    re.IGNORECASE,
)


def degree(sentence: str, evidence: str) -> str | None:
    """A lot of quality lost on one side, practically none on the other ("Q8_0 loses a lot of
    quality" against "practically the same quality"); each side must say only one of the two."""

    def says(text: str) -> str | None:
        much, none = bool(_MUCH_LOST.search(text)), bool(_NOTHING_LOST.search(text))
        return (
            "a lot lost" if much and not none else "practically nothing lost" if none and not much else None
        )

    mine, theirs = says(sentence), says(evidence)
    return f"{mine} / {theirs}" if mine and theirs and mine != theirs else None


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.casefold()))


def antonym(sentence: str, evidence: str) -> str | None:
    """The opposed pair ("higher" / "lower") when one side has a word the other has the
    opposite of, and neither has both."""
    said, lesson = words(sentence), words(evidence)
    for word in sorted(said - lesson):
        for opposite in sorted(_OPPOSITE.get(word, ())):
            if opposite in lesson and opposite not in said:
                return f"{word} / {opposite}"
    return None


# Units of one quantity: the same value in another of them is another amount ("128 KB" / "128 MB").
_SIZES = frozenset({"kb", "mb", "gb", "tb"})


def quantities(text: str) -> dict[str, set[str]]:
    """Numbers by the unit that follows them: {"gb": {"7", "28"}}. A model size ("8B") names a
    model rather than measuring something, so it is left out, as are the digits of a name
    ("Q8_0 or") and a number followed by a stop word ("released in 2024 at")."""
    out: dict[str, set[str]] = {}
    for value, upper, unit in _QUANTITY.findall(text):
        if (unit := _unit(unit)) != "b" and unit not in STOPWORDS:  # not "2024 at", "0.47 for"
            out.setdefault(unit, set()).update(v.replace(",", "") for v in (value, upper) if v)
    for match in _BLOCK.finditer(text):
        out.setdefault(BLOCK_UNIT, set()).add(next(v for v in match.groups() if v))
    return out


# A block's (or group's) size, however it is written: "blocks of 128", "64 weights per block",
# "a group size such as 128" are one quantity, which the number's next word does not name.
BLOCK_UNIT = "per block"
_BLOCK = re.compile(
    r"(?<![\w-])(?:blocks?|groups?) of (\d+)\b|\b(\d+) (?:weights? |values? )?per (?:block|group)\b|"
    r"\b(?:block|group) size (?:of |such as )?(\d+)\b|\b(\d+)-weight (?:blocks?|groups?)\b",
    re.IGNORECASE,
)


def _unit(written: str) -> str:
    """A unit as compared: "GBs" and "gb" are one; "b" is a model size ("8B")."""
    unit = written.casefold()
    return unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit


def number_clash(sentence: str, evidence: str, about: str = "") -> str | None:
    """A value the sentence gives in a unit the lesson sentence also uses, with other values;
    the lesson's value in another size unit; or another value for the same unit and condition
    ("4 GB at 8K tokens" against "1 GB at 8K tokens, 4 GB at 32K"). Sentences about models of
    different sizes ("8B", "70B") or different formats ("FP16", "FP32") are about different
    things, and a value belongs to the model size it follows."""
    sizes, their_sizes = _model_sizes(sentence), _model_sizes(evidence)
    if sizes and their_sizes and not sizes & their_sizes:
        return None
    if not _same_format(_formats(sentence), _formats(f"{evidence} {about}")):
        return None
    said = _said_of(evidence, sizes)
    lesson = quantities(said)
    for unit, values in quantities(sentence).items():
        theirs = lesson.get(unit)
        if theirs and not values & theirs:
            return f"{sorted(values)[0]} {unit} / {sorted(theirs)[0]} {unit}"
        if unit in _SIZES and not theirs:
            for other in _SIZES & lesson.keys():
                if values & lesson[other]:
                    return f"{sorted(values & lesson[other])[0]} {unit} / {other}"
    paired = pairs(said)
    for key, values in pairs(sentence).items():
        theirs = paired.get(key)
        if theirs and not values & theirs:
            unit, condition = key
            return f"{sorted(values)[0]} {unit} at {condition} / {sorted(theirs)[0]} {unit}"
    return None


# A quantity said of a condition: "1 GB at 8K tokens", "about 5 GB at Q4_K_M", "16 GB in FP16".
_PAIR = re.compile(
    r"(\d+(?:[.,]\d+)*)\s*(%|[a-zA-Z]+)\s+(?:at|in|for)\s+(?:the\s+)?(?:full\s+)?"
    rf"(\d+(?:\.\d+)?[kKmM]?\b|{_FORMAT}|\d+-bit)"
)


def pairs(text: str) -> dict[tuple[str, str], set[str]]:
    """Values by (unit, condition): {("gb", "8k"): {"1"}}. A list ("1 GB at 8K tokens, 4 GB at
    32K") gives each value its own condition, which the unit alone does not."""
    out: dict[tuple[str, str], set[str]] = {}
    for value, unit, condition in _PAIR.findall(text):
        if (unit := _unit(unit)) != "b":  # "8B at Q4_K_M" names a model, as in quantities
            out.setdefault((unit, condition.casefold()), set()).add(value.replace(",", ""))
    return out


_MODEL_SIZE = re.compile(r"\b\d+(?:\.\d+)?B\b")


def _model_sizes(text: str) -> set[str]:
    return {m.casefold() for m in _MODEL_SIZE.findall(text)}


def _said_of(text: str, sizes: set[str]) -> str:
    """The parts of ``text`` said of one of ``sizes`` (from a model size to the next) and the
    part before any size: "70B at Q4_K_M needs about 42 GB … than the 8B model" gives 42 GB
    to 70B, not to 8B. The whole text when ``sizes`` is empty."""
    if not sizes:
        return text
    parts = _MODEL_SIZE.split(text)
    owners = [None, *(m.casefold() for m in _MODEL_SIZE.findall(text))]
    return " ".join(
        part for part, owner in zip(parts, owners, strict=True) if owner is None or owner in sizes
    )


_FORMATS = re.compile(rf"\b{_FORMAT}\b")


def _formats(text: str) -> set[str]:
    """The number formats and quant types a text names: "fp16", "q4_k_m", "int8", "nf4"."""
    return {m.casefold() for m in _FORMATS.findall(text)}


def _same_format(formats: set[str], theirs: set[str]) -> bool:
    """Whether two texts can be about the same format: one names none, or they share one
    ("Q4" is Q4_K_M's family). A table row for FP32 says nothing about FP16's size."""
    return (
        not formats or not theirs or any(a.startswith(b) or b.startswith(a) for a in formats for b in theirs)
    )


def names(text: str) -> list[str]:
    """The names in ``text`` in order, once each; "larger models" and "large ones" are both "large"."""
    seen: list[str] = []
    for match in _NAME.finditer(text):
        key = _name_key(match.group(0))
        if key not in seen:
            seen.append(key)
    return seen


def _name_key(name: str) -> str:
    first = name.casefold().split()[0]
    return _SIZE_WORDS.get(first, first) if " " in name else name.casefold()


_SIZE_WORDS = {"smaller": "small", "larger": "large", "bigger": "large", "big": "large"}


_COMPARISON = re.compile(
    r"\b(?:better|worse|more|less|fewer|faster|slower|smaller|larger|bigger|higher|lower|beats?|"
    r"outperforms?|preserves?|keeps?|suffers?|tolerates?|wins?)\b",
    re.IGNORECASE,
)
_LOSER = re.compile(r"\b(?:than|over)\b", re.IGNORECASE)


def roles(text: str) -> tuple[str | None, str | None]:
    """(winner, loser) of the first comparison in ``text``: the first name before the compared
    word, and the first name after it (after "than" / "over" when there is one)."""
    spans = [m.span() for m in _NAME.finditer(text)]
    found = next(
        (m for m in _COMPARISON.finditer(text) if not any(a <= m.start() < b for a, b in spans)), None
    )
    if found is None:
        return None, None
    clause = re.split(r"[,;:]|\band\b|\bbut\b|\bwhile\b", text[: found.start()])[-1]
    before = names(clause)
    rest = text[found.end() :]
    loser_at = _LOSER.search(rest)
    after = names(rest[loser_at.end() if loser_at else 0 :])
    return (before[0] if before else None), (after[0] if after else None)


def swapped(sentence: str, evidence: str) -> str | None:
    """A comparison the lesson makes one way round and the sentence the other."""
    mine, theirs = roles(sentence), roles(evidence)
    winner, loser = mine
    if winner is None or theirs[0] is None:
        return None
    if winner == theirs[1] or (loser is not None and loser == theirs[0] and winner != theirs[0]):
        return f"{winner} / {loser or theirs[0]} swapped"
    return None


# How much of the rest two sentences must share for one to be the other with a name changed.
RENAMED_SHARED = 0.7


def renamed(sentence: str, evidence: str) -> str | None:
    """The lesson sentence said of another name: "Q5_K_S stores weights in blocks of 32, each
    block holding 32 eight-bit integers" against the lesson's "Q8_0 stores …". The two name
    different things and share most of their other words (``RENAMED_SHARED``)."""
    mine, theirs = names(sentence), names(evidence)
    if not mine or not theirs or set(mine) & set(theirs):
        return None
    said, lesson = words(_NAME.sub(" ", sentence)), words(_NAME.sub(" ", evidence))
    if not said or len(said & lesson) / len(said | lesson) < RENAMED_SHARED:
        return None
    return f"{mine[0]} / {theirs[0]}"


def contradiction(sentence: str, evidence: str, about: str = "") -> str | None:
    """How ``sentence`` says the opposite of ``evidence`` (a close lesson sentence, from the
    section titled ``about``), or None."""
    if found := number_clash(sentence, evidence, about):
        return f"a different number: {found}"
    tests = ((swapped, "swapped roles"), (antonym, "the opposite word"), (degree, "the opposite degree"))
    for test, label in tests:
        if found := test(sentence, evidence):
            return f"{label}: {found}"
    return None


# How many words next to a turned word (on one side) must read as the lesson does.
CONTEXT_WORDS = 2
_TOKEN = re.compile(r"[a-z0-9]+(?:[._'-][a-z0-9]+)*", re.IGNORECASE)


def _tokens(text: str) -> list[str]:
    """The words as written (names keep their case: "GPTQ", "70B")."""
    return _TOKEN.findall(text.replace("’", "'"))


def _holds(tokens: list[str], run: list[str]) -> bool:
    return any(tokens[i : i + len(run)] == run for i in range(len(tokens) - len(run) + 1))


def _runs(tokens: list[str]) -> frozenset[tuple[str, ...]]:
    """Every run of CONTEXT_WORDS + 1 consecutive words in ``tokens``."""
    return frozenset(zip(*(tokens[i:] for i in range(CONTEXT_WORDS + 1)), strict=False))


def _reads(
    runs: frozenset[tuple[str, ...]], said: list[str], positions: tuple[int, ...], named: bool = False
) -> set[str]:
    """The sides ("left", "right") on which ``runs`` (a lesson sentence's, ``_runs``) hold, at
    every one of ``positions`` of ``said``, the word with its CONTEXT_WORDS neighbours on that
    side; unless the words are ``named`` (names are specific enough), a neighbour must be a
    content word: "the most important", not "is more than"."""
    sides = set()
    for side in ("left", "right"):
        wanted = [
            tuple(
                said[max(0, p - CONTEXT_WORDS) : p + 1] if side == "left" else said[p : p + CONTEXT_WORDS + 1]
            )
            for p in positions
        ]
        if all(
            len(run) == CONTEXT_WORDS + 1
            and (named or any(w not in STOPWORDS and w != said[p] for w in run))
            and run in runs
            for run, p in zip(wanted, positions, strict=True)
        ):
            sides.add(side)
    return sides


def turned(sentence: str, evidence: Sequence[str]) -> tuple[int, str] | None:
    """The lesson sentence (its index in ``evidence``) that has the opposite of one of the
    sentence's words ("least / most"), two of its names the other way round, or its negation
    the other way ("there is a calibration step" / "there is no calibration step"), word for
    word: next to the change the turned sentence reads as that lesson sentence does, and the
    sentence as written reads so in none; with how."""
    written = _tokens(sentence)
    said = [w.casefold() for w in written]
    lessons = [[w.casefold() for w in _tokens(unit)] for unit in evidence]
    runs = [_runs(lesson) for lesson in lessons]
    every = frozenset().union(*runs)
    named = [i for i, word in enumerate(written) if _NAME.fullmatch(word)]
    changes: list[tuple[list[str], tuple[int, ...], bool, str]] = []
    for i, word in enumerate(said):
        for opposite in sorted(_OPPOSITE.get(word, ())):
            changes.append(([*said[:i], opposite, *said[i + 1 :]], (i,), False, f"{word} / {opposite}"))
    for a, i in enumerate(named):
        for j in named[a + 1 :]:
            if said[i] != said[j]:
                other = said.copy()
                other[i], other[j] = said[j], said[i]
                changes.append((other, (i, j), True, f"{said[i]} / {said[j]} swapped"))
    for other, positions, names_only, how in changes:
        # Read in any lesson sentence as written, on a side: not turned round on that side.
        turned_sides = _reads(every, other, positions, names_only) - _reads(
            every, said, positions, names_only
        )
        if turned_sides:
            for index, lesson_runs in enumerate(runs):
                if _reads(lesson_runs, other, positions, names_only) & turned_sides:
                    return index, how
    for other, at, how in _negations(said):
        # The words either side of the change, turned and as written.
        run, written_run = (seq[max(0, at - CONTEXT_WORDS) : at + CONTEXT_WORDS + 1] for seq in (other, said))
        if any(w not in STOPWORDS for w in run) and not any(
            _holds(lesson, written_run) for lesson in lessons
        ):
            for index, lesson in enumerate(lessons):
                if _holds(lesson, run):
                    return index, how
    return None


_NEGATORS = frozenset({"not", "no", "never"})
_AUXILIARIES = frozenset(
    {"is", "are", "was", "were", "does", "do", "did", "will", "should", "must", "has", "have"}
)


def _negations(said: list[str]) -> list[tuple[list[str], int, str]]:
    """The sentence with its negation taken out ("is not" → "is") or one put in ("there is a
    step" → "there is no step", "can" → "cannot"): each with the position of the change."""
    out = []
    for i, word in enumerate(said):
        if word in _NEGATORS:
            out.append(([*said[:i], *said[i + 1 :]], i, f"{word} / (no {word})"))
        elif word == "cannot":
            out.append(([*said[:i], "can", *said[i + 1 :]], i, "cannot / can"))
        elif word == "can" and (i + 1 == len(said) or said[i + 1] not in _NEGATORS):
            out.append(([*said[:i], "cannot", *said[i + 1 :]], i, "can / cannot"))
        elif word in _AUXILIARIES and i + 1 < len(said) and said[i + 1] not in _NEGATORS:
            if said[i + 1] in {"a", "an", "any", "some"}:
                out.append(
                    ([*said[: i + 1], "no", *said[i + 2 :]], i + 1, f"{word} {said[i + 1]} / {word} no")
                )
            else:
                out.append(([*said[: i + 1], "not", *said[i + 1 :]], i + 1, f"{word} / {word} not"))
    return out


# How much of a clause's topic a lesson sentence about the other name must hold (``crossed``),
# and at least two of its words (or its one): at one shared word of two, a model's sentence
# ("Q5_K_M models are released in 8B; community uploads of 70B models") crossed by "models".
CROSSED_SHARE = 0.5
_BITS = re.compile(r"\b\d+-bit\b", re.IGNORECASE)


def crossed(parts: Sequence[str], evidence: Sequence[str]) -> tuple[int, str] | None:
    """Two clauses that say the lesson's two things the other way round: "AWQ quantizes column by
    column, while GPTQ scales the salient channels up", where the lesson says the first of GPTQ
    and the second of AWQ. Each clause names something the other does not, and each is said, in
    its topic words, by a lesson sentence that names what the other clause names and not its
    own (and not by one that names its own). The first such sentence's index, with how."""
    named = [_crossing_names(part) for part in parts]
    for i, first in enumerate(parts):
        for j in range(i + 1, len(parts)):
            mine, theirs = named[i] - named[j], named[j] - named[i]
            if not mine or not theirs:
                continue
            there = _said_about(first, theirs, mine, evidence)
            back = _said_about(parts[j], mine, theirs, evidence)
            if there is not None and back is not None:
                return there, f"{sorted(mine)[0]} / {sorted(theirs)[0]} swapped between clauses"
    return None


def _crossing_names(text: str) -> set[str]:
    return set(names(text)) | {b.casefold() for b in _BITS.findall(text)}


def _said_about(clause: str, names_: set[str], not_names: set[str], evidence: Sequence[str]) -> int | None:
    """The first lesson sentence that says ``clause``'s topic words (CROSSED_SHARE of them, two
    at least) of one of ``names_`` and names none of ``not_names``; None when none does, or when
    one says it of the clause's own names (``not_names``) instead."""
    topic = _topic(clause)
    if not topic:
        return None
    found = None
    for index, unit in enumerate(evidence):
        shared = len(topic & _topic(unit))
        if shared < CROSSED_SHARE * len(topic) or shared < min(2, len(topic)):
            continue
        unit_names = _crossing_names(unit)
        if unit_names & not_names and not unit_names & names_:
            return None  # the lesson says it of the clause's own name: as written
        if found is None and unit_names & names_ and not unit_names & not_names:
            found = index
    return found


def _topic(text: str) -> set[str]:
    return {t for t in content_tokens(_BITS.sub(" ", _NAME.sub(" ", text))) if not t[0].isdigit()}


# What a named thing is, where the kinds exclude each other: GGUF is a file format, GPTQ and
# AWQ are methods. A claim that calls one of them the other kind says the opposite.
KINDS = ("format", "method", "library")
_KIND_OF = re.compile(
    rf"((?:{_NAME.pattern})(?:(?:,\s*|,?\s+(?:and|or)\s+)(?:{_NAME.pattern}))*)\s+(?:is|are)\s+"
    rf"(?:(?:an?|the|both|all)\s+)?(?:(?!(?:not|no|neither|nor|never)\b)[\w-]+\s+){{0,2}}?"
    rf"({'|'.join(KINDS)})s?\b"
)


def kinds(text: str) -> dict[str, str]:
    """What ``text`` says each name is, among KINDS: {"gguf": "format"} from "GGUF is a file format"."""
    out: dict[str, str] = {}
    for subject, kind in _KIND_OF.findall(text):
        for name in names(subject):
            out.setdefault(name, kind)
    return out


def recategorized(sentence: str, evidence: Sequence[str]) -> tuple[int, str] | None:
    """The first lesson sentence that says one of the sentence's names is another kind of thing
    than the sentence says (KINDS: "GGUF is a quantization method" against "GGUF is a file
    format"), with how; None when none does."""
    said = kinds(sentence)
    if not said:
        return None
    for index, unit in enumerate(evidence):
        for name, kind in kinds(unit).items():
            if said.get(name, kind) != kind:
                return index, f"{name}: {said[name]} / {kind}"
    return None
