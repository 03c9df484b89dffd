"""The QA part of the quality measurement: the tutor's own answers to its evaluation questions.

At every precision the tutor answers the same few on-lesson questions (greedy, the same token
cap); :mod:`tutor.lab.measure` scores each answer against the reference's (token F1) and by its
support check (groundedness). ``qa_label`` names the question set and its settings in the
cache key.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import yaml

from tutor.engine.memory import give_back_freed_when_grown
from tutor.lab.measure import Cancel, Progress, QAResult, check_cancel, is_cancelled
from tutor.library.content import default_content_dir

if TYPE_CHECKING:
    from tutor.assistant.retrieval import Retriever
    from tutor.engine import Engine

QA_SET = default_content_dir() / "eval_questions.yaml"
QA_MAX_NEW_TOKENS = 96  # the tutor's own cap (tutor.assistant.tutor_chat.MAX_NEW_TOKENS)


def load_qa_questions(limit: int, path: Path = QA_SET) -> list[tuple[str, str]]:
    """(question, lesson id) pairs spread evenly over the tutor's on-lesson evaluation set."""
    if limit <= 0 or not path.exists():
        return []
    items = yaml.safe_load(path.read_text(encoding="utf-8"))["on_lesson"]
    step = max(1, len(items) // limit)
    return [(item["question"], item["lesson"]) for item in items[::step][:limit]]


class _CancelFlag:
    """``cancel`` (an Event or a callable) as the Event-like object ``ask`` polls per token."""

    def __init__(self, cancel: Cancel) -> None:
        self._cancel = cancel

    def is_set(self) -> bool:
        return is_cancelled(self._cancel)


def qa_answers(
    engine: Engine,
    retriever: Retriever,
    questions: Sequence[tuple[str, str]],
    precision: str,
    *,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> list[QAResult]:
    """The tutor's answers to ``questions`` at ``precision`` (``progress`` phase "qa <precision>").

    Raises Cancelled between questions, or within one token of an answer, once ``cancel`` is set.
    """
    from tutor.assistant.tutor_chat import ask

    phase = f"qa {precision}"
    stop = None if cancel is None else cast("threading.Event", _CancelFlag(cancel))
    engine.switch(precision, wait=True)
    if progress is not None:
        progress(phase, 0, len(questions))
    results = []
    for done, (question, lesson_id) in enumerate(questions, 1):
        check_cancel(cancel)
        give_back_freed_when_grown()  # a window read trims the same way (Engine.window_logits)
        answer = ask(question, retriever, engine, lesson_id, cancel=stop, max_new_tokens=max_new_tokens)
        check_cancel(cancel)  # a cancelled answer is cut short: not a measurement
        results.append(
            QAResult(answer.generated, sum(s.supported for s in answer.sentences), len(answer.sentences))
        )
        if progress is not None:
            progress(phase, done, len(questions))
    return results


def qa_label(questions: Sequence[tuple[str, str]], max_new_tokens: int) -> str:
    """The QA set as the cache key names it: file, count, the questions' digest, the token cap,
    the rules that cut a looping answer and end one, the support check's version, the index
    format (the passages a question is answered from) and the prompts' version."""
    from tutor.assistant.grounding import PROMPT_VERSION
    from tutor.assistant.lesson_vectors import INDEX_FORMAT
    from tutor.assistant.support import CHECK_VERSION
    from tutor.assistant.tutor_chat import LOOP_ROUNDS, STOP_VERSION

    digest = hashlib.sha256(json.dumps(list(questions)).encode()).hexdigest()[:12]
    rules = (
        f"loop_rounds={LOOP_ROUNDS}:stop={STOP_VERSION}:check={CHECK_VERSION}:index={INDEX_FORMAT}"
        f":prompt={PROMPT_VERSION}"
    )
    return f"{QA_SET.name}:{len(questions)}:{digest}:tokens={max_new_tokens}:{rules}"
