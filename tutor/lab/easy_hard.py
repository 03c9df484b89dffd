"""Easy vs hard: a short classification against a long greedy continuation, at every precision.

*Easy*: each quiz question of the lessons as a classification: the choice whose text the model
finds most likely after "Question: … Answer:" (mean log-probability of its tokens; no decoding).
Agreement is the share of questions where a precision picks the choice bf16 picks.

*Hard*: bf16 continues lesson text greedily for ``long`` tokens; a precision's continuation is
identical to bf16's for its first k tokens exactly when its top token agrees with bf16's at each
of those k positions, reading bf16's continuation (one window pass per precision, no decoding).
Where bf16 itself ranks two tokens within ``TIE`` logits, either counts (a near-tie that another
kernel may flip; bf16 read this way agrees with its own decoding). The share of continuations
still identical after k tokens falls like compound interest on the per-token disagreement: that
is what "cliffs on hard tasks" looks like.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.lab.cache import cache_file, cache_key, read_json, write_json
from tutor.lab.measure import REFERENCE, Cancel, Progress, check_cancel
from tutor.lab.windows import lesson_windows, pick_windows
from tutor.library.content import Library
from tutor.library.models import Question

if TYPE_CHECKING:
    import torch

    from tutor.engine import Engine

LONG = 128  # tokens of each greedy continuation (the plans' default)
# Two correct bf16 kernels move a top-2 gap by up to 0.375 here (tests/engine/numerics.py): picks
# within this many logits of bf16's best count as bf16's own.
TIE = 0.5
PROMPT_TOKENS = 64  # lesson text each continuation starts from
VERSION = 1


@dataclass(frozen=True)
class EasyHardRow:
    precision: str
    quiz_agreement: float  # share of quiz questions where the picked letter is bf16's
    quiz_accuracy: float  # share picked right (the answer key)
    questions: int
    identical: list[float]  # identical[k-1]: share of continuations identical to bf16's for k tokens
    continuations: int

    @property
    def checkpoints(self) -> tuple[int, int]:
        """The lengths the table reports: a quarter of the continuation, and all of it."""
        return max(1, len(self.identical) // 4), len(self.identical)

    def same_after(self, tokens: int) -> float:
        return self.identical[tokens - 1]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), **{f"identical_{k}": self.same_after(k) for k in self.checkpoints}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EasyHardRow:
        return cls(**{k: v for k, v in data.items() if not k.startswith("identical_")})


def choice_picks(engine: Engine, questions: Sequence[Question]) -> list[int]:
    """The choice each question's text makes most likely (mean log-probability of its tokens
    after "Question: … Answer:"), at the engine's precision: a classification with no decoding."""
    picks = []
    for question in questions:
        prefix = engine.tokenizer(f"Question: {question.stem}\nAnswer:", add_special_tokens=False)[
            "input_ids"
        ]
        choices = [
            engine.tokenizer(f" {c.text}", add_special_tokens=False)["input_ids"] for c in question.choices
        ]
        longest = max(len(c) for c in choices)
        # Right-padded to one length: a causal model's scores before the padding do not see it.
        rows = [prefix + c + [c[-1]] * (longest - len(c)) for c in choices]
        logprobs = engine.window_logprobs(rows, start=len(prefix) - 1)
        scores = [float(logprobs[i, range(len(c)), c].mean()) for i, c in enumerate(choices)]
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


@dataclass(frozen=True)
class _Path:
    """A lesson-text prompt, bf16's greedy continuation of it, and at each of its positions
    bf16's top token read this way (``own``) and the tokens bf16 ranks within ``TIE`` of it
    (near-ties a kernel change may flip)."""

    prompt: list[int]
    tokens: list[int]
    own: list[int]
    near: list[set[int]]


def _logits_along(engine: Engine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    return engine.window_logits([prompt + tokens], start=len(prompt) - 1)[0]


def reference_paths(
    engine: Engine, prompts: Sequence[list[int]], continuations: Sequence[list[int]]
) -> list[_Path]:
    """Read bf16's continuations with bf16 (the engine's precision) and note its near-ties."""
    paths = []
    for prompt, tokens in zip(prompts, continuations, strict=True):
        logits = _logits_along(engine, prompt, tokens)
        best = logits.max(-1, keepdim=True).values
        near = [
            set(map(int, (row >= top - TIE).nonzero()[:, 0].tolist()))
            for row, top in zip(logits, best, strict=True)
        ]
        paths.append(_Path(list(prompt), list(tokens), logits.argmax(-1).tolist(), near))
    return paths


def identical_shares(engine: Engine, paths: Sequence[_Path], long: int) -> list[float]:
    """For k = 1..long, the share of continuations whose first k tokens the engine's precision
    would have decoded greedily too: its top token is bf16's, or one bf16 ranks as a near-tie.
    At bf16 itself, the paths' own reading is that precision's (the same pass, no second read)."""
    agree_until = []
    for path in paths:
        if engine.precision == REFERENCE:
            picks = path.own
        else:
            picks = _logits_along(engine, path.prompt, path.tokens).argmax(-1).tolist()
        same = [
            pick == token or pick in near
            for pick, token, near in zip(picks, path.tokens, path.near, strict=False)
        ]
        if len(path.tokens) < long:  # bf16 ended its continuation there: ending it too is agreeing
            same.append(picks[len(path.tokens)] in engine.stop_ids)
        agree_until.append(same.index(False) if False in same else long)
    return [sum(n >= k for n in agree_until) / len(agree_until) for k in range(1, long + 1)]


def _continuations(
    engine: Engine, library: Library, count: int, folder: Path | None, key: dict[str, Any]
) -> tuple[list[list[int]], list[list[int]]]:
    """``count`` lesson-text prompts spread over the lessons and bf16's greedy continuation of
    each (decoded once, as one batch, then cached)."""
    windows = lesson_windows(engine.tokenizer, library, PROMPT_TOKENS)
    prompts = [windows[i] for i in pick_windows(len(windows), spread=count)]
    path = cache_file({**key, "what": "continuations", "prompts": prompts}, folder, "easy-hard-bf16")
    cached = read_json(path)
    if isinstance(cached, list) and len(cached) == len(prompts):
        return prompts, cached
    engine.switch(REFERENCE, wait=True)
    # Lesson text, not a chat: the model goes on for `long` tokens unless it ends the text itself.
    continuations = engine.continue_greedy(prompts, key["long"])
    write_json(path, continuations)
    return prompts, continuations


def easy_hard_rows(
    engine: Engine,
    library: Library,
    precisions: Sequence[str],
    *,
    questions: int,
    continuations: int,
    long: int = LONG,
    folder: Path | None = None,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> list[EasyHardRow]:
    """One row per precision (bf16 first), from the cache where measured before."""
    key = cache_key(
        engine, library, questions=questions, continuations=continuations, long=long, version=VERSION
    )
    order = list(dict.fromkeys([REFERENCE, *precisions]))
    rows: dict[str, EasyHardRow] = {}
    for precision in order:
        cached = read_json(cache_file({**key, "precision": precision}, folder, f"easy-hard-{precision}"))
        with contextlib.suppress(TypeError, AttributeError):  # absent, or another version's row
            rows[precision] = EasyHardRow.from_dict(cached)
    missing = [p for p in order if p not in rows]
    if not missing:
        return [rows[p] for p in order]
    quiz = [q for lesson in library.ordered() for q in lesson.questions]
    quiz = [quiz[i] for i in pick_windows(len(quiz), spread=questions)]
    check_cancel(cancel)
    if progress is not None:
        progress("easy vs hard", 0, len(missing) + 1)
    prompts, followed = _continuations(engine, library, continuations, folder, key)
    engine.switch(REFERENCE, wait=True)
    paths = reference_paths(engine, prompts, followed)
    reference_picks: list[int] = []
    for done, precision in enumerate(dict.fromkeys([REFERENCE, *missing]), 1):
        check_cancel(cancel)
        engine.switch(precision, wait=True)
        picks = choice_picks(engine, quiz)
        reference_picks = reference_picks or picks  # bf16 comes first
        row = EasyHardRow(
            precision=precision,
            quiz_agreement=sum(a == b for a, b in zip(picks, reference_picks, strict=True)) / len(picks),
            quiz_accuracy=sum(p == q.correct_index for p, q in zip(picks, quiz, strict=True)) / len(picks),
            questions=len(picks),
            identical=identical_shares(engine, paths, long),
            continuations=len(paths),
        )
        if precision in missing:
            write_json(
                cache_file({**key, "precision": precision}, folder, f"easy-hard-{precision}"), row.as_dict()
            )
            rows[precision] = row
        if progress is not None:
            progress("easy vs hard", done, len(missing) + 1)
    engine.switch(REFERENCE, wait=True)
    return [rows[p] for p in order]
