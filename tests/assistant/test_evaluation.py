"""The evaluation sets: well formed, and the tutor's figures on both, printed and held to.

The tuning set is what the retrieval, quote and support-check constants were tuned on; the
held-out set was written from the lessons alone before issue 10's tuning and is never tuned
on. The held-out marks sit one question (or claim) below what was measured when they were
set, so a change that costs more than that fails here, and README's table stays true.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MEASURED
from tutor.assistant.chunks import FRONT_MATTER
from tutor.assistant.evaluation import (
    VERDICTS,
    EvalSet,
    Figures,
    answers_table,
    contains_key_fact,
    evaluate,
    evaluate_answers,
    load_eval_set,
)
from tutor.assistant.retrieval import Retriever
from tutor.cli import run
from tutor.library.content import Library

pytestmark = pytest.mark.model
KINDS = {"negation", "antonym", "number", "swapped_roles"}


@pytest.fixture(scope="module", params=["tuning", "heldout"])
def eval_set(request: pytest.FixtureRequest) -> EvalSet:
    return load_eval_set(request.param)


@pytest.fixture(scope="module")
def figures(shared_retriever: Retriever) -> dict[str, Figures]:
    return {name: evaluate(shared_retriever, load_eval_set(name)) for name in ("tuning", "heldout")}


def test_sets_are_well_formed(eval_set: EvalSet, library: Library) -> None:
    assert len(eval_set.on_lesson) >= 30 and len(eval_set.off_topic) >= 10 and len(eval_set.claims) >= 20
    assert len({q.question for q in eval_set.on_lesson}) == len(eval_set.on_lesson)
    for item in eval_set.on_lesson:
        for lesson_id, section in item.golds:
            assert section in FRONT_MATTER or library.get(lesson_id).section(section), (lesson_id, section)
        text = (library.get(item.lesson).folder / "lesson.md").read_text(encoding="utf-8")
        assert item.key_fact and contains_key_fact(text, item.key_fact), item
    for claim in eval_set.claims:
        assert library.get(claim.lesson).section(claim.section) is not None, claim
        assert (claim.kind in KINDS) == (claim.verdict == "contradicts"), claim
    assert {c.verdict for c in eval_set.claims} == set(VERDICTS)
    assert {c.kind for c in eval_set.claims if c.kind} == KINDS


def test_key_facts_are_matched_as_written() -> None:
    quote = "Memory ≈ number of parameters × bits per weight ÷ 8, because **8 bits** make a byte."
    assert contains_key_fact(quote, ["number of parameters × bits per weight ÷ 8", "8 bits make a byte"])
    assert not contains_key_fact(quote, ["16 bits"])


def test_tuning_set_figures(
    figures: dict[str, Figures], record_property: Callable[[str, object], None]
) -> None:
    tuning = figures["tuning"]
    record_property(MEASURED, tuning.report())  # printed at the end of the run, passed or not
    shares = tuning.as_dict()
    # Off-topic: its third batch, machine learning near the lessons, is the hardest (13 of 30).
    assert shares["hit_at_3"] >= 0.98 and shares["off_topic_declined"] >= 0.82, tuning.report()
    assert shares["on_topic_wrongly_declined"] <= 0.03, tuning.report()
    assert shares["key_fact_quoted"] >= 0.68, tuning.report()
    recall = shares["claims_recall"]
    assert recall["supported"] >= 0.90 and recall["contradicts"] >= 0.92, tuning.report()


def test_heldout_set_figures(
    figures: dict[str, Figures], record_property: Callable[[str, object], None]
) -> None:
    heldout = figures["heldout"]
    record_property(MEASURED, heldout.report())
    # Measured when set (README, "How well the tutor answers"): 64/67 hits (63 while the
    # passages' quant names lost their underscores), 19/20 declined (15 before the fields
    # elsewhere), 1/67 wrongly declined (2 before the lower known-words threshold), 48/67 key
    # facts, claims 9/10 (8 while "without" negated a sentence), 5/5, 13/17 (11 before
    # turned-round sentences contradicted; 14/17 once block sizes, a new number against the whole
    # passage and another kind of thing were checked).
    assert heldout.hits >= 63 and heldout.declined >= 18 and heldout.wrongly_declined <= 2, heldout.report()
    assert heldout.key_fact_quoted >= 47, heldout.report()
    row = heldout.confusion
    assert row["supported"]["supported"] >= 8 and row["not_found"]["not_found"] >= 4, heldout.report()
    assert row["contradicts"]["contradicts"] >= 13, heldout.report()


def test_eval_command_names_a_broken_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "set.yaml"
    broken.write_text("on_lesson:\n  - {lesson: x, question: q}\n", encoding="utf-8")
    assert run(["eval", str(broken)]) == 2
    assert f"{broken}: on_lesson item 1 has no 'section'" in capsys.readouterr().err


def test_the_models_answers_are_checked_sentence_by_sentence(  # type: ignore[no-untyped-def]
    bf16_engine, shared_retriever: Retriever
) -> None:
    rows = evaluate_answers(bf16_engine, shared_retriever, load_eval_set("heldout"), ["bf16"], 1)
    [row] = rows
    assert row.precision == "bf16" and row.answers == 1
    assert row.sentences == sum(row.verdicts.values()) > 0 and row.decode_tok_s
    table = answers_table("eval_heldout", rows)
    assert "✗ contradicts" in table
    assert table.splitlines()[-1].split()[:5] == ["bf16", "1", "plain", "1", str(row.sentences)]
