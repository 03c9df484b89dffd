"""Where one answer departs from another, word by word (for side-by-side precision answers)."""

from __future__ import annotations

from difflib import SequenceMatcher


def departures(reference: str, answer: str) -> list[tuple[str, bool]]:
    """The words of ``answer``, each with True where it is not in the reference's place."""
    ref_words, words = reference.split(), answer.split()
    same = [False] * len(words)
    for block in SequenceMatcher(a=ref_words, b=words, autojunk=False).get_matching_blocks():
        for offset in range(block.size):
            same[block.b + offset] = True
    return [(word, not kept) for word, kept in zip(words, same, strict=True)]
