"""The tutor: retrieval and grounding wired to the model engine.

Used by ``quant-tutor ask`` and by the TUI's chat, so both answer the same way: the
lesson's own sentence first, then the model's short explanation at the engine's current
precision, checked sentence by sentence against the cited passages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from tutor.assistant import grounding
from tutor.assistant.answer_stats import AnswerStats
from tutor.text import sentences

if TYPE_CHECKING:
    import threading

    from tutor.assistant.retrieval import Retriever
    from tutor.engine import Engine
    from tutor.engine.remote import RemoteEngine
    from tutor.engine.reports import TokenEvent

MAX_NEW_TOKENS = 96  # three short sentences; a 135M model rambles past that
MAX_SENTENCES = 3
# Context-aware decoding's alpha for the tutor's answers (0: plain decoding). Measured on ten
# held-out questions (README, "How well the tutor answers"): at bf16 the share of the model's
# sentences the lesson supports went from 0.16 (alpha 0) to 0.54 (0.5) and 0.68 (1), at nf4
# from 0.33 to 0.53 and 0.45; decoding costs about 0.63x the tokens/s at bf16. The issue asks
# for bf16 "as faithful to the passage as decoding can make it": 1.
CAD_ALPHA = 1.0
# Answer-first: the model's turn opens with the quoted lesson sentence and the model continues
# after it, instead of starting from nothing (issue 10). Decided by `quant-tutor eval
# --generate` on the held-out set (README, "How well the tutor answers").
ANSWER_FIRST = False
# A finished sentence ends in a full stop, "!" or "?", then any closing quotes or brackets ('…
# 16-bit."', "(… in int8.)"); a closing bracket alone ends nothing: int8's answer in the Tutor
# tab stopped on "… precision. LLM.int8()", counted as its third sentence.
_FINISHED = re.compile(r"""[.!?]["”’')\]]*$""")
# A full stop that may not end anything yet, while the answer streams: after a number ("a
# threshold (6." goes on as "6.0") or right after a word, before any space ("llama." goes on as
# "llama.cpp"); a sentence's own end is followed by the next token's space.
_OPEN_END = re.compile(r"\d\.\s*$|\w\.$")
# Raised when the rule that ends an answer changes: the Lab's QA cache key names it.
# 2: a number ending in a full stop no longer ends a streaming answer's sentence; 3: an answer
# ends where the model writes one of the prompt's labels; 4: nor does a full stop right after
# a word until the next token shows it ends a sentence; 5: nor a closing bracket without a full
# stop, "!" or "?" before it.
STOP_VERSION = 5
# The prompt's own labels: a model that writes one after its answer has begun another turn
# ("… no measurable quality loss up to 175B parameters. Question: What is bitsandbytes?"; 20 of
# 370 answers to the tuning questions at bf16 and fp4).
_NEW_TURN = re.compile(r"\s(?:Question|Passages):")


def answer_part(text: str) -> str:
    """``text`` up to where the model starts a turn of its own, if it does."""
    found = _NEW_TURN.search(text)
    return text[: found.start()] if found else text


def complete_sentences(text: str, streaming: bool = False) -> list[str]:
    """The distinct finished sentences of ``text``, in order (a small model repeats itself).
    ``streaming``: more may follow, so a full stop that closes the text is not an end yet after
    a number ("a threshold (6." may go on as "6.0") or right after a word ("llama." as
    "llama.cpp")."""
    if streaming and _OPEN_END.search(text):
        text = text.rstrip()[:-1]
    kept: list[str] = []
    for sentence in sentences(text):
        if _FINISHED.search(sentence.rstrip()) and sentence not in kept:
            kept.append(sentence)
    return kept


# The prompt numbers its passages "[1] Section: …"; held to them, the model sometimes echoes a
# number ("[4] QLoRA trains…", "[Passage 4] Key terms…"), which says nothing to the learner.
_PASSAGE_NUMBER = re.compile(r"(?:^|(?<=\s))\[(?:passage )?\d{1,2}\]\s*", re.IGNORECASE)


# A small model sometimes loops: "… KL divergence speed speed speed speed …" to the token cap.
# The answer stops once its last few words have come round this many times in a row, and keeps
# the first round.
LOOP_ROUNDS = 3
LOOP_MAX_WORDS = 8  # the longest looping phrase looked for, in words
_WORD = re.compile(r"\S+")


def loop_start(text: str) -> int | None:
    """Where ``text`` ends in a loop, the index its second round starts at (what to cut), else
    None: its last n words (n up to ``LOOP_MAX_WORDS``, punctuation and case aside) repeated
    ``LOOP_ROUNDS`` times or more in a row."""
    found = list(_WORD.finditer(text))
    words = [w.group(0).strip(".,;:!?\"'()").casefold() for w in found]
    for n in range(1, LOOP_MAX_WORDS + 1):
        phrase = words[-n:]
        rounds = 0
        while len(words) >= (rounds + 1) * n and words[len(words) - (rounds + 1) * n :][:n] == phrase:
            rounds += 1
        if rounds >= LOOP_ROUNDS:
            return found[len(words) - (rounds - 1) * n].start()
    return None


def tidy(text: str, max_sentences: int = MAX_SENTENCES) -> str:
    """At most ``max_sentences`` distinct finished sentences, without echoed passage numbers; a
    lone unfinished one is kept as is. A loop at the end is cut to its first round, marked "…"."""
    text = _PASSAGE_NUMBER.sub("", answer_part(text))
    cut = loop_start(text)
    if cut is not None:
        text = text[:cut].rstrip(" ,;:")
        text += "" if _FINISHED.search(text) else "…"
    done = complete_sentences(text)
    return " ".join(done[:max_sentences]) if done else text.strip()


def ask(
    question: str,
    retriever: Retriever,
    engine: Engine | RemoteEngine,
    lesson_id: str | None = None,
    on_token: Callable[[TokenEvent], None] | None = None,
    cancel: threading.Event | None = None,
    on_prepared: Callable[[grounding.PreparedAnswer], None] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_sentences: int = MAX_SENTENCES,
    alpha: float = CAD_ALPHA,
    answer_first: bool = ANSWER_FIRST,
) -> grounding.TutorAnswer:
    """Answer ``question`` from the lessons; the model runs only when they cover it.

    ``on_prepared`` sees the retrieval result (quote, citations or the decline) before the
    model starts, so a screen can show the lesson's sentence while the explanation streams.
    ``answer_first``: the model's turn opens with the quote and its text is what follows.
    """
    prepared = grounding.prepare(question, retriever, lesson_id)
    if on_prepared is not None:
        on_prepared(prepared)
    if not prepared.grounded:
        return grounding.finish(prepared, "", AnswerStats(), retriever.embed, engine.precision)
    pieces: list[str] = []

    def token(event: TokenEvent) -> None:
        pieces.append(event.text)
        if on_token is not None:
            on_token(event)

    def stop() -> bool:
        # Stop once the answer has its sentences, or loops, instead of letting the model repeat.
        if cancel is not None and cancel.is_set():
            return True
        text = "".join(pieces)
        if answer_part(text) != text:
            return True
        return len(complete_sentences(text, streaming=True)) >= max_sentences or loop_start(text) is not None

    reply = engine.generate(
        prepared.messages,
        max_new_tokens=max_new_tokens,
        on_token=token,
        cancel=stop,
        wait=True,
        contrast=grounding.contrast_messages(prepared.messages) if alpha > 0 else None,
        alpha=alpha,
        prefix=prepared.quote.text if answer_first and prepared.quote else "",
    )
    if cancel is not None and cancel.is_set():
        why = "cancelled"
    elif reply.stats.cancelled:  # the engine's own cancel here is stop(): enough said, or a loop
        why = "loop" if loop_start(answer_part(reply.text)) is not None else "sentences"
    else:
        why = reply.stats.stop_reason
    stats = AnswerStats.from_reply(reply.stats, why)
    text = tidy(reply.text, max_sentences)
    return grounding.finish(prepared, text, stats, retriever.embed, reply.stats.precision)
