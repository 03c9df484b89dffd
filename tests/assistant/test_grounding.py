"""Grounding: sentences, the prompt, declining without the model, the quote and the support check."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SEED
from tutor.assistant.answer_stats import AnswerStats
from tutor.assistant.chunks import KEY_TERMS, PRACTICE, PREMISE, SUMMARY
from tutor.assistant.grounding import (
    DECLINE,
    MAX_QUESTION_CHARS,
    NO_PASSAGES,
    PASSAGE_TOKEN_BUDGET,
    Messages,
    answer,
    build_messages,
    contrast_messages,
    decline_message,
    finish,
    limit_question,
    prepare,
    sentences,
)
from tutor.assistant.hits import Hit, SearchResult
from tutor.assistant.intent import LessonPart, lesson_part, question_type
from tutor.assistant.quote import best_quote, leans_back, spans
from tutor.assistant.retrieval import Retriever
from tutor.assistant.support import check_support, evidence_units, negated
from tutor.assistant.tutor_chat import answer_part, complete_sentences, loop_start, tidy

STATS = AnswerStats(ttft_s=0.2, tokens=12, tokens_per_s=30.0, weights_mib=256.0, stop="eos")


@pytest.fixture(scope="session")
def retriever(shared_retriever: Retriever) -> Retriever:
    """conftest's session retriever: loaded once, its index in a session temp dir."""
    return shared_retriever


class FakeModel:
    """Stands in for the engine: records the prompts, returns a fixed reply."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.calls: list[Messages] = []

    def __call__(self, messages: Messages) -> tuple[str, AnswerStats]:
        self.calls.append(messages)
        return self.reply, STATS


def hit(text: str, section: str = "What quantization does well", lesson: str = SEED) -> Hit:
    return Hit(lesson, "A lesson", section, f"{lesson}#x/0", text, 0.03, 0.6, 1, 1)


# --- sentences ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Use int8. It is near-lossless.", ["Use int8.", "It is near-lossless."]),
        ("Small formats, e.g. NF4, save memory. Fine.", ["Small formats, e.g. NF4, save memory.", "Fine."]),
        (
            "A 7B model needs about 3.5 GB at 4 bits. Q4_K_M is 4.8 bpw.",
            ["A 7B model needs about 3.5 GB at 4 bits.", "Q4_K_M is 4.8 bpw."],
        ),
        (
            "LLM.int8() (Dettmers et al., 2022) keeps outliers. It is slow.",
            ["LLM.int8() (Dettmers et al., 2022) keeps outliers.", "It is slow."],
        ),
        ("Is it good? Yes! Mostly.", ["Is it good?", "Yes!", "Mostly."]),
        (
            "Options:\n- int8 for quality\n- NF4 for memory.\n* FP4 too",
            ["Options:", "int8 for quality", "NF4 for memory.", "FP4 too"],
        ),
        ("1. First step.\n2. Second step, i.e. the last.", ["First step.", "Second step, i.e. the last."]),
        ("The answer is **int8**.\nIt wraps\nover lines.", ["The answer is int8.", "It wraps over lines."]),
        ("Run this:\n```\nllama-bench -m a.gguf\n```\nDone.", ["Run this:", "Done."]),
        ("| Type | Bits |\n|---|---|\n| Q8_0 | 8.5 |", ["Type: Q8_0; Bits: 8.5"]),
        ("\x1b[31mRed\x1b[0m text.\x07", ["Red text."]),
        ("Open [the lab](quant-tutor:lab) (key `b`).", ["Open the lab (key `b`)."]),
        ("", []),
        ("  ...  ", []),
    ],
)
def test_sentences(text: str, expected: list[str]) -> None:
    assert sentences(text) == expected


def test_negation_parity() -> None:
    assert negated("4-bit is not usable for chat.")
    assert not negated("int4 is usable for chat.")
    # "without" negates its object, not the sentence: these two still say opposite things.
    assert not negated("Lost capability can be recovered without more precision.")
    assert negated("Quantization cannot recover lost capability without re-introducing precision.")
    assert not negated("bitsandbytes quantizes the model while it loads, without any calibration.")
    assert not negated("bitsandbytes quantizes a model as it loads, with no calibration step.")
    assert negated("There is no calibration step.")
    assert negated("It doesn't help.") and negated("It can’t help.")
    assert not negated("It is not that it cannot help.")
    # A ", not …" phrase is a clause of its own, so the sentence's positive half is a unit too.
    awq = [hit("AWQ protects salient channels by scaling, not by storing them in higher precision.")]
    assert "AWQ protects salient channels by scaling" in evidence_units(awq)


# --- the prompt -----------------------------------------------------------------------------


def test_build_messages_carries_numbered_passages() -> None:
    hits = [hit("int4 is usable for chat."), hit("Averages hide damage.", "How quality is measured")]
    messages = build_messages("Is 4-bit OK for chat?", hits, max_sentences=2)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "only the passages" in messages[0]["content"] and "at most 2" in messages[0]["content"]
    user = messages[1]["content"]
    assert "[1] int4 is usable for chat.\n[2] Averages hide damage." in user
    assert "How quality is measured" not in user  # a section's name was echoed as an answer's opening
    assert user.rstrip().endswith("Question: Is 4-bit OK for chat?")
    system_style = build_messages("Is 4-bit OK for chat?", hits, style="system")
    assert "[1] int4 is usable for chat." in system_style[0]["content"]
    assert system_style[1]["content"] == "Is 4-bit OK for chat?"


def test_build_messages_cuts_long_passages_at_sentences() -> None:
    long = " ".join(f"Sentence number {i} talks about int8 and NF4 at some length." for i in range(400))
    messages = build_messages(
        "What about int8?", [hit(long), hit(long, "NF4 and FP4"), hit(long, "The quality cliff")]
    )
    total = sum(len(m["content"]) for m in messages)
    assert total < PASSAGE_TOKEN_BUDGET * 4 + 600
    for line in messages[1]["content"].splitlines():
        if line.startswith("["):
            assert line.endswith("length."), line[-40:]


def test_the_contrast_prompt_is_the_request_without_its_passages() -> None:
    for style in ("user", "system"):
        messages = build_messages("Is int8 lossless?", [hit("int8 is near-lossless.")], style=style)
        plain = contrast_messages(messages)
        assert [m["role"] for m in plain] == [m["role"] for m in messages]
        assert "near-lossless" not in json.dumps(plain) and "near-lossless" in json.dumps(messages)
        # The label stays, so the two sides differ by the passages alone, not by "Passages:".
        assert json.dumps(plain).count(f"Passages:\\n{NO_PASSAGES}") == 1
        assert plain[-1]["content"].endswith("Is int8 lossless?")
        assert plain[0]["content"].startswith("You are a friendly tutor.")


def test_a_loop_is_cut_to_its_first_round() -> None:
    """SmolLM2-135M's answer to "Give me the gist." at bf16 ran on as "… speed speed speed" to
    the token cap; the answer stops once a phrase comes round three times and keeps one round."""
    said = "It gives a fuller picture: perplexity speed KL divergence speed speed speed speed"
    assert tidy(said) == "It gives a fuller picture: perplexity speed KL divergence speed…"
    assert tidy("It works out, it works out, it works out") == "It works out…"
    assert tidy("Q8 is 8 bits. Q8 is 8 bits. Q8 is 8 bits.") == "Q8 is 8 bits."  # no "…" after a stop
    assert loop_start("speed speed") is None and loop_start("int8 is near-lossless. int4 is not.") is None
    assert loop_start("a b c a b c a b c") == 6  # the second round of a three-word phrase


def test_a_number_ending_in_a_full_stop_ends_no_sentence_while_the_answer_streams() -> None:
    # nf4's answer to "Why is int8 called near-lossless?" stopped at its third "sentence":
    # "… values above a threshold (6." — the stream was about to say "6.0".
    said = "int8 is near-lossless. It halves memory. Outliers above a threshold (6."
    assert len(complete_sentences(said, streaming=True)) == 2
    assert len(complete_sentences(said + "0 by default) stay in 16-bit. The", streaming=True)) == 3
    assert len(complete_sentences("Q4_K works out to 4.5.")) == 1  # once the answer has ended
    # bf16's answer to "What does KL divergence measure?" in the Tutor tab ended on "llama.",
    # about to say "llama.cpp".
    said = "KL divergence compares whole distributions. It needs a base file. Run it in llama."
    assert len(complete_sentences(said, streaming=True)) == 2
    assert len(complete_sentences(said + " Then", streaming=True)) == 3


def test_a_closing_bracket_ends_a_sentence_only_after_a_full_stop() -> None:
    # int8's answer to "Why is int8 called near-lossless?" in the Tutor tab stopped on "…
    # precision. LLM.int8()", its third "sentence".
    said = "LLM.int8() made 8-bit inference work. Outliers wreck the precision. LLM.int8()"
    assert len(complete_sentences(said, streaming=True)) == 2
    assert tidy(said) == "LLM.int8() made 8-bit inference work. Outliers wreck the precision."
    closed = 'It keeps outliers (in 16-bit.) The lesson says "near-lossless." NF4 (4-bit) "fits"'
    assert complete_sentences(closed) == [
        "It keeps outliers (in 16-bit.)",
        'The lesson says "near-lossless."',
    ]


def test_tidy_drops_echoed_passage_numbers() -> None:
    said = "[4] QLoRA trains adapters on a frozen NF4 model. NF4 keeps quality [1] better. A[0] stays. And"
    assert tidy(said) == "QLoRA trains adapters on a frozen NF4 model. NF4 keeps quality better. A[0] stays."
    assert tidy("[Passage 4] Key terms: KL compares.") == "Key terms: KL compares."


def test_an_answer_ends_where_the_model_starts_a_turn_of_its_own() -> None:
    # bf16's answer to "Why is int8 called near-lossless?" in the Tutor tab went on to ask itself
    # "Question: What is bitsandbytes?", the prompt's own label.
    said = (
        "The paper reported no measurable quality loss up to 175B parameters. Question: What is bitsandbytes?"
    )
    assert tidy(said) == "The paper reported no measurable quality loss up to 175B parameters."
    assert answer_part("A question: is int8 lossless?") == "A question: is int8 lossless?"  # not the label
    assert answer_part("Question: none before it") == "Question: none before it"


def test_limit_question() -> None:
    text, cut = limit_question("x" * (MAX_QUESTION_CHARS + 50))
    assert cut and len(text) == MAX_QUESTION_CHARS
    assert limit_question("  What\x1b[2J is\n int8? ") == ("What is int8?", False)


# --- declining ------------------------------------------------------------------------------


def test_off_topic_declines_without_calling_the_model(retriever: Retriever) -> None:
    model = FakeModel("Boil it for seven minutes.")
    result = answer("How long should I boil an egg?", retriever, model, lesson_id=SEED, precision="int8")
    assert model.calls == []
    assert not result.grounded and result.generated == "" and result.sentences == []
    assert result.answer.startswith(DECLINE) and "closest sections" in result.answer
    assert result.citations == [] and len(result.see_also) == 3
    assert result.precision == "int8"
    data = json.loads(json.dumps(result.as_dict()))
    assert data["grounded"] is False and data["generated"] == "" and data["sentences"] == []
    assert set(data["stats"]) >= {"ttft_s", "tokens", "tokens_per_s", "weights_mib"}
    assert data["see_also"][0]["section"] == result.see_also[0].section


def test_decline_points_to_a_related_lesson() -> None:
    closest = [hit("x", "The memory math for Hermes", "hermes-q4-vs-q8")]
    closest = [
        Hit("hermes-q4-vs-q8", "Hermes Q4 vs Q8", h.section, h.anchor, "x", 0.01, 0.2, 1, None)
        for h in closest
    ]
    result = SearchResult("q", [], False, closest, 0.2)
    text = decline_message(result, lesson_id=SEED)
    assert text.startswith(DECLINE)
    assert "“The memory math for Hermes” (Hermes Q4 vs Q8)" in text
    assert "related lesson “Hermes Q4 vs Q8”" in text
    assert "related lesson" not in decline_message(result, lesson_id="hermes-q4-vs-q8")
    assert decline_message(SearchResult("q", [], False, [], 0.0)) == DECLINE


# --- answering ------------------------------------------------------------------------------


def test_answer_quotes_the_lesson_cites_and_checks(retriever: Retriever) -> None:
    reply = "int4 is usable for chat, classification and simple generation. 4-bit is not usable for chat."
    model = FakeModel(reply)
    result = answer("Is 4-bit good enough for a chatbot?", retriever, model, lesson_id=SEED, precision="nf4")
    assert len(model.calls) == 1 and model.calls[0] == build_messages(
        result.question, retriever.search(result.question, lesson_id=SEED).hits
    )
    assert result.grounded and result.generated == reply and result.precision == "nf4"
    assert result.quote is not None and result.answer == result.quote.text
    assert any(result.quote.text in c.text for c in result.citations)  # the quote is the lesson's own words
    assert 1 <= len(result.citations) <= 3
    for citation in result.citations:
        assert citation.lesson_id and citation.section and citation.text and citation.score > 0
    assert [s.supported for s in result.sentences] == [True, False]
    assert "opposite" in result.sentences[1].reason
    assert result.supported_share == 0.5
    data = json.loads(json.dumps(result.as_dict()))
    assert list(data)[:8] == [
        "question",
        "answer",
        "generated",
        "precision",
        "grounded",
        "citations",
        "sentences",
        "stats",
    ]
    assert set(data["citations"][0]) >= {"lesson", "section", "text", "score"}
    assert set(data["sentences"][0]) == {"text", "supported", "verdict", "score", "reason", "evidence"}
    assert data["stats"]["tokens"] == 12 and data["stats"]["retrieval_ms"] >= 0
    assert data["quote"]["lesson"] == result.quote.lesson_id


def test_answer_without_a_model_still_quotes(retriever: Retriever) -> None:
    result = answer(
        "Can I get the lost quality back without adding precision?", retriever, None, lesson_id=SEED
    )
    assert result.grounded and result.generated == "" and result.sentences == []
    first = "Quantization cannot recover lost capability without re-introducing precision."
    assert result.answer.startswith(first)
    assert result.answer == result.quote.text and len(sentences(result.answer)) <= 2  # type: ignore[union-attr]
    assert result.citations[0].section == "What quantization cannot do"


def test_prepare_then_finish_for_streaming(retriever: Retriever) -> None:
    prepared = prepare("What does double quantization save?", retriever, lesson_id=SEED)
    assert prepared.grounded and prepared.messages and prepared.quote is not None
    assert "0.37 bits" in prepared.quote.text
    done = finish(
        prepared,
        "Double quantization saves about 0.37 bits per weight.",
        STATS,
        retriever.embed,
        "bf16",
    )
    assert done.precision == "bf16" and done.stats.tokens == 12 and done.stats.retrieval_ms is not None
    assert [s.supported for s in done.sentences] == [True]


def test_markup_and_escapes_come_back_as_plain_text(retriever: Retriever) -> None:
    model = FakeModel("\x1b[2J[bold]int8[/bold] keeps quality with minimal loss.\x07")
    result = answer("\x1b[31mIs [bold]int8[/bold] near-lossless?\x1b[0m", retriever, model, lesson_id=SEED)
    assert result.question == "Is [bold]int8[/bold] near-lossless?"
    assert result.generated == "[bold]int8[/bold] keeps quality with minimal loss."
    blob = json.dumps(result.as_dict())
    assert "\\u001b" not in blob and "\\u0007" not in blob


def test_best_quote_prefers_the_answering_sentence(retriever: Retriever) -> None:
    hits = retriever.section_hits(SEED, "What quantization does well")
    quote = best_quote("Is 4-bit good enough for a chatbot?", hits, retriever.embed)
    assert quote is not None and quote.section == "What quantization does well"
    assert quote.text.startswith("int4 is usable for chat")
    assert best_quote("anything", [], retriever.embed) is None


def test_a_sentence_that_leans_back_comes_with_the_one_before(retriever: Retriever) -> None:
    assert leans_back("That is why Q3_K_M comes out near 4 bits per weight on this model.")
    assert leans_back("GGUF names follow a pattern.")  # too short to stand alone
    assert not leans_back("Quantization stores a model's numbers in fewer bits, rounding each weight.")
    hits = retriever.section_hits("fp16-q8-q6-q5-q4", "Sizes for a 7B or 8B model")
    texts = [s.text for s in spans(hits)]
    alone = "That is why Q3_K_M comes out near 4 bits per weight on this model."
    assert alone not in texts  # only with the sentence it leans on
    assert any(t.endswith(f"kept at higher precision. {alone}") for t in texts)
    paragraph = [h for h in hits if alone in h.text]
    quote = best_quote("Why is Q3_K_M almost 4 bits per weight?", paragraph, retriever.embed)
    assert quote is not None and quote.text.endswith(alone) and quote.text != alone


def test_question_types_and_lesson_parts() -> None:
    assert question_type("Why does quality fall off below 4 bits?") == "why"
    assert question_type("How much memory does a 7B model need in int8?") == "how_much"
    assert question_type("Which is better for chat, NF4 or FP4?") == "which"
    assert question_type("What is calibration?") == "define"
    assert question_type("Is int8 lossless?") == "yes_no"
    assert lesson_part("What's the gist of this lesson?") is not None
    assert lesson_part("What's the gist of this lesson?").section == PREMISE  # type: ignore[union-attr]
    assert lesson_part("Sum it up in one line").section == SUMMARY  # type: ignore[union-attr]
    assert lesson_part("What are the key terms?").section == KEY_TERMS  # type: ignore[union-attr]
    step = lesson_part("What's step two of the practice?")
    assert step is not None and (step.section, step.index) == (PRACTICE, 1)
    assert lesson_part("What's the last practice step?") == LessonPart(PRACTICE, -1)
    assert lesson_part("Does int8 lose quality at all?") is None
    # A step named by its title in quotes, straight or curly; "the step from Q4 to Q8" is no step.
    assert lesson_part('What do I do in the "estimate before you download" step?') == LessonPart(PRACTICE)
    assert lesson_part("What's the “write your own rule” step?") == LessonPart(PRACTICE)
    assert lesson_part("Is the step from Q4 to Q8 worth it?") is None
    assert lesson_part("What is NF4?") is None


def test_the_quote_names_what_the_question_names(retriever: Retriever) -> None:
    """A question naming two things ("a 7B model", "int8") is quoted a span naming both: the
    lesson's row for a 7B model at int8, not LLM.int8()'s history, which names 6.7B."""
    from tutor.assistant.quote import names_all

    quote = prepare("How big is a 7B model in int8?", retriever, SEED).quote
    assert quote is not None and "7 GB" in quote.text and "int8" in quote.text, quote
    assert names_all(["7b", "int8"], quote.text) and not names_all(["7b"], quote.text)  # two or more


def test_a_question_naming_a_lesson_part_is_answered_from_it(retriever: Retriever) -> None:
    gist = prepare("Give me the gist.", retriever, SEED)
    assert gist.grounded and gist.result.hits[0].section == PREMISE
    # The lesson's other overview comes second: "the gist" is either of them.
    assert gist.result.hits[1].section == SUMMARY and len(gist.result.hits) == 3
    summary = prepare("Sum it up in one line", retriever, SEED)
    assert [h.section for h in summary.result.hits[:2]] == [SUMMARY, PREMISE]
    # The premise's point and the sentence that carries it, not one of the two.
    assert gist.quote is not None and "int8 is typically near-lossless" in gist.quote.text
    assert "storing its weights in lower precision" in gist.quote.text
    step = prepare("What's the second practice step?", retriever, SEED)
    assert step.grounded and step.result.hits[0].section == PRACTICE
    assert step.quote is not None and "two possible next steps" in step.quote.text
    # No number: the one step whose words the question shares
    memory = prepare("What's the memory math exercise?", retriever, "hermes-q4-vs-q8")
    assert memory.quote is not None and "Work out which Hermes 3 8B file fits" in memory.quote.text


# --- the support check ----------------------------------------------------------------------


def test_a_wrong_clause_inside_a_run_on_sentence_is_caught(retriever: Retriever) -> None:
    """SmolLM2-135M's bf16 answer to "What's the main idea of this lesson?": close to the premise
    as a whole, with int8 and int4 swapped in its second clause."""
    premise = retriever.section_hits(SEED, "Premise")
    said = (
        "Quantization cuts an AI model's memory and raises its throughput by storing its weights in "
        "lower precision; int8 hits noticeable quality cliffs on hard tasks."
    )
    [check] = check_support(said, premise, retriever.embed)
    assert check.verdict == "contradicts" and "in “int8 hits noticeable quality cliffs" in check.reason
    assert "int4 hits noticeable quality cliffs" in check.evidence
    right = said.replace("int8 hits", "int4 hits")
    assert [c.verdict for c in check_support(right, premise, retriever.embed)] == ["supported"]
    # A clause clashes only with a unit about the same thing; a question asserts nothing
    decision = retriever.section_hits("gguf-awq-gptq-decision", "The decision: memory and quality")
    said_there = "At FP16 it needs a 24 GB GPU or more when both fit, but avoid going below about 4 bits."
    [loose] = check_support(said_there, decision, retriever.embed)
    assert "avoid going below" not in loose.reason, loose  # not against "5 and 6 bits are very close"
    [asked] = check_support("Is int8 good enough, or do I lose a lot of quality?", premise, retriever.embed)
    assert asked.verdict == "not_found" and asked.reason == "a question, not a claim"


def test_a_lesson_sentence_said_of_another_name_contradicts(retriever: Retriever) -> None:
    """SmolLM2-135M's bf16 answer to "How much smaller is Q5_K_M than Q8_0?" gave Q8_0's block
    layout as Q5_K_S's, word for word; where the lesson says it of the name asked, it stands."""
    from tutor.assistant.contradiction import renamed

    hits = retriever.section_hits("fp16-q8-q6-q5-q4", "Q8_0")
    layout = "stores weights in blocks of 32, each block holding 32 eight-bit integers and one 16-bit scale."
    [check] = check_support(f"Q5_K_S {layout}", hits, retriever.embed)
    assert check.verdict == "contradicts" and "another name: q5_k_s / q8_0" in check.reason, check
    assert [c.verdict for c in check_support(f"Q8_0 {layout}", hits, retriever.embed)] == ["supported"]
    assert renamed("NF4 keeps quality.", "NF4 keeps quality.") is None  # the same name
    assert renamed("Q6_K is small and fast.", "Q8_0 stores 32 weights a block.") is None  # little shared


def test_a_lot_lost_against_practically_nothing_lost_is_the_opposite() -> None:
    from tutor.assistant.contradiction import contradiction, degree

    lesson = "Q8_0 is about half the size of 16-bit with practically the same quality."
    how = contradiction("Q8_0 loses a lot of quality compared with 16-bit.", lesson)
    assert how == "the opposite degree: a lot lost / practically nothing lost"
    assert degree("int8 is near-lossless.", lesson) is None  # the same degree
    # A side that says both (int8 near-lossless; int4 a big loss) says neither
    assert degree("Q4 loses a lot.", "int8 is near-lossless; int4 loses a lot on hard tasks.") is None


def test_a_sentence_that_reads_as_the_lesson_once_turned_round_contradicts(retriever: Retriever) -> None:
    """An opposite word, or two names exchanged, found word for word in a lesson sentence too long
    to be close in meaning to the claim."""
    from tutor.assistant.contradiction import turned

    gptq = retriever.section_hits("gguf-awq-gptq-decision", "GPTQ")
    [check] = check_support(
        "The act-order option quantizes the least important columns first.", gptq, retriever.embed
    )
    assert (
        check.verdict == "contradicts"
        and check.reason == "the lesson says otherwise (turned round: least / most)"
    ), check
    lesson = ["It makes a small difference at Q6_K and above and a larger one at Q4 and below."]
    swapped = (
        "The importance matrix makes a small difference at Q4 and below and a larger one at Q6_K and above."
    )
    assert turned(swapped, lesson) == (0, "q4 / q6_k swapped")
    assert turned(lesson[0], lesson) is None  # as the lesson says it
    # Where the lesson says it both ways, the sentence as written stands.
    assert turned("Small models lose more.", ["Small models lose more.", "Large models lose less."]) is None
    # Stopwords alone are no context: "is more than" says nothing about what is more.
    assert turned("It is more than that.", ["It is less than that."]) is None
    # Negation the other way round, taken out or put in.
    step = ["There is no calibration step and no special file."]
    assert turned("There is a calibration step when bitsandbytes loads a model.", step) == (0, "is a / is no")
    assert turned("There is no calibration step at all.", step) is None
    assert turned("GGUF cannot use calibration data.", ["GGUF can use calibration data."]) == (
        0,
        "cannot / can",
    )


def test_a_value_given_for_another_condition_in_a_list_contradicts() -> None:
    from tutor.assistant.contradiction import number_clash, pairs, quantities

    # Digits inside a name and words such as "or", "at", "for" after a number are not amounts.
    assert quantities("Hermes runs at Q4_K_M or Q6_K; Q8_0 or NF4 weights in blocks") == {}
    assert quantities("released in 2024, fine-tuned from Llama 3.1 at 8B") == {}
    assert quantities("about 4 to 5 bits, 1,024 samples") == {"bit": {"4", "5"}, "sample": {"1024"}}

    lesson = "The cache takes about 1 GB at 8K tokens, 4 GB at 32K and 16 GB at the full 128K."
    assert pairs(lesson) == {("gb", "8k"): {"1"}, ("gb", "32k"): {"4"}, ("gb", "128k"): {"16"}}
    assert number_clash("The KV cache takes about 4 GB at 8K tokens.", lesson) == "4 gb at 8k / 1 gb"
    assert number_clash("The KV cache takes about 4 GB at 32K tokens.", lesson) is None
    assert number_clash("Hermes 3 8B needs 16 GB in FP16.", "About 5 GB at Q4_K_M and 16 GB in FP16.") is None
    # Another format's row says nothing of this one's; a sentence is about its section's format.
    row = "Precision: FP32; Bits per weight: 32; Weights of a 7B model: about 28 GB"
    assert number_clash("In FP16, a 7B model's weights take roughly 14 GB.", row) is None
    assert number_clash("In FP32, a 7B model's weights take roughly 14 GB.", row) == "14 gb / 28 gb"
    unnamed = "It works out to about 4.6 bits per weight, a little under Q5_K_M's 5.7."
    claim = "Q4_K_S works out to about 5.5 bits per weight."
    assert number_clash(claim, unnamed) is None
    assert number_clash(claim, unnamed, "Q4_K_S") is not None
    # A value belongs to the model size it follows: 42 GB is 70B's, whatever 8B is compared with.
    both = "Hermes 3 70B at Q4_K_M needs about 42 GB, and it usually outperforms the 8B model."
    assert number_clash("Hermes 3 8B at Q4_K_M runs on a GPU with 12 GB of memory.", both) is None
    assert number_clash("Hermes 3 70B at Q4_K_M needs about 24 GB.", both) == "24 gb / 42 gb"


def test_a_negation_in_another_clause_is_not_the_opposite(retriever: Retriever) -> None:
    # bf16's answer to "Why is int8 called near-lossless?" in the Tutor tab: its first clause is
    # the lesson's sentence word for word, its "no measurable quality loss" another clause's.
    outliers = retriever.section_hits(SEED, "LLM.int8(): keeping the outliers")
    cases = [
        (
            "LLM.int8() uses mixed-precision decomposition; it uses bitsandbytes; the paper reported "
            "no measurable quality loss up to 175B parameters.",
            "not_found",
        ),
        ("LLM.int8() does not use mixed-precision decomposition; it uses bitsandbytes.", "contradicts"),
        # a negated clause pointing back at the other one negates it
        ("LLM.int8() uses mixed-precision decomposition; that is not true.", "contradicts"),
    ]
    for said, verdict in cases:
        assert [c.verdict for c in check_support(said, outliers, retriever.embed)] == [verdict], said


def test_a_block_size_is_one_quantity_however_it_is_written(retriever: Retriever) -> None:
    from tutor.assistant.contradiction import BLOCK_UNIT, quantities

    for written in ("in blocks of 64", "64 weights per block", "scales per block of 64 weights"):
        assert quantities(written)[BLOCK_UNIT] == {"64"}, written
    # Levels per block are levels, and a super-block is another thing.
    assert BLOCK_UNIT not in quantities("with 256 levels per block, super-blocks of 256")
    nf4 = retriever.section_hits(SEED, "NF4 and FP4")
    for size, verdict in (("128", "contradicts"), ("64", "supported")):
        said = f"bitsandbytes scales NF4 weights in blocks of {size}."
        assert [c.verdict for c in check_support(said, nf4, retriever.embed)] == [verdict]


def test_a_new_number_is_held_against_the_whole_passage(retriever: Retriever) -> None:
    # "That works out to (32 × 8 + 16) ÷ 32 = 8.5 bits per weight" is not among the claim's
    # closest sentences; it is in its section (Q8_0) and says the same of the same thing.
    q8 = retriever.section_hits("fp16-q8-q6-q5-q4", "Q8_0")
    [wrong] = check_support("Q8_0 works out to 9.5 bits per weight.", q8, retriever.embed)
    assert wrong.verdict == "contradicts" and "9.5 bit / 8.5 bit" in wrong.reason, wrong
    [right] = check_support("Q8_0 works out to 8.5 bits per weight.", q8, retriever.embed)
    assert right.verdict == "supported", right
    # A number about another name is only not found.
    [other] = check_support("Q6_K works out to 6.6 bits per weight.", q8, retriever.embed)
    assert other.verdict == "not_found", other


def test_a_name_called_another_kind_of_thing_contradicts(retriever: Retriever) -> None:
    from tutor.assistant.contradiction import kinds

    assert kinds("GGUF is a quantization method, while GPTQ and AWQ are file formats.") == {
        "gguf": "method",
        "gptq": "format",
        "awq": "format",
    }
    assert kinds("GGUF is not a method.") == {} and kinds("NF4 is neither a format nor a method.") == {}
    formats = retriever.section_hits("gguf-awq-gptq-decision", "Formats versus methods")
    for said, verdict in (
        ("GGUF is a quantization method, while GPTQ and AWQ are file formats.", "contradicts"),
        ("GPTQ is a file format.", "contradicts"),
        ("GGUF is a file format, and GPTQ and AWQ are methods.", "supported"),
    ):
        assert [c.verdict for c in check_support(said, formats, retriever.embed)] == [verdict], said


def test_two_things_said_the_other_way_round_across_clauses(retriever: Retriever) -> None:
    from tutor.assistant.contradiction import crossed

    lesson = [
        "GPTQ quantizes a layer's weights column by column.",
        "AWQ scales those channels up before quantizing.",
    ]
    said = ["AWQ quantizes weights column by column", "GPTQ scales the salient channels up"]
    assert crossed(said, lesson) == (0, "awq / gptq swapped between clauses")
    assert (
        crossed(["GPTQ quantizes weights column by column", "AWQ scales the salient channels up"], lesson)
        is None
    )
    # One clause the other way round is not enough: the lesson must say each of the other name.
    assert crossed(["AWQ quantizes weights column by column", "GPTQ uses a calibration set"], lesson) is None
    # Nor is one topic word of two ("models"): SmolLM2's "Q5_K_M models are released in 8B;
    # community uploads of 70B models" against the lesson's FP8 versions of the 70B model.
    fp8 = [
        "For GPU servers, Nous also publishes FP8 versions of the 70B and 405B models.",
        "Community uploads of the 8B come in every K-quant.",
    ]
    assert crossed(["Q5_K_M models are released in 8B", "community uploads of 70B models"], fp8) is None
    outliers = retriever.section_hits(SEED, "LLM.int8(): keeping the outliers")
    swapped = "Feature dimensions above the threshold are multiplied in int8, and the rest in 16-bit."
    [check] = check_support(swapped, outliers, retriever.embed)
    assert check.verdict == "contradicts" and "swapped between clauses" in check.reason, check
    right = "Feature dimensions above the threshold are multiplied in 16-bit, and the rest in int8."
    assert check_support(right, outliers, retriever.embed)[0].verdict != "contradicts"


def test_a_lesson_sentence_is_not_contradicted_by_its_neighbour(retriever: Retriever) -> None:
    # The tutor's own hits for "What does double quantization do to the scales?": the sentence,
    # word for word, sat next to "… fits in 8 bits, 4 bits or fewer" and was ✗ by its bits.
    hits = retriever.section_hits(SEED, "What quantization is") + retriever.section_hits(SEED, "NF4 and FP4")
    said = "Double quantization then quantizes those scales too, saving about 0.37 bits per weight."
    assert [c.verdict for c in check_support(said, hits, retriever.embed)] == ["supported"]
    wrong = "Double quantization then quantizes those scales too, saving about 4 bits per weight."
    assert [c.verdict for c in check_support(wrong, hits, retriever.embed)] == ["contradicts"]


def test_verbatim_lesson_sentences_are_supported(retriever: Retriever) -> None:
    hits = retriever.section_hits(SEED, "What quantization cannot do")
    text = " ".join(sentences(hits[0].text + " " + hits[1].text)[:4])
    checks = check_support(text, hits, retriever.embed)
    assert len(checks) == 4 and all(c.supported for c in checks), checks
    assert all(c.score > 0.95 and c.evidence for c in checks)


def test_unrelated_and_contradicting_sentences_are_not_supported(retriever: Retriever) -> None:
    well = retriever.section_hits(SEED, "What quantization does well")
    cannot = retriever.section_hits(SEED, "What quantization cannot do")
    memory = retriever.section_hits(SEED, "How much memory quantization saves")
    nf4 = retriever.section_hits(SEED, "NF4 and FP4")
    cases = [
        (well, "The Eiffel Tower is in Paris.", "not_found"),
        (cannot, "Yes, you can.", "not_found"),  # SmolLM2-135M's own answer: nothing to check
        (cannot, "Lost capability can be recovered without more precision.", "contradicts"),
        (memory, "The weights of a 7B model take about 28 GB in int8.", "contradicts"),  # a number
        (memory, "In FP16, the weights of a 7B model take roughly 14 GB.", "supported"),  # not FP32's row
        (nf4, "FP4 usually preserves quality better than NF4.", "contradicts"),  # swapped roles
        (nf4, "NF4 usually preserves quality better than FP4.", "supported"),
    ]
    for hits, sentence, verdict in cases:
        [check] = check_support(sentence, hits, retriever.embed)
        assert check.verdict == verdict, (sentence, check)
        assert check.mark.startswith({"supported": "✓", "not_found": "?", "contradicts": "✗"}[verdict])
        assert check.supported == (verdict == "supported")
        assert check.as_dict()["verdict"] == verdict
    assert check_support("", well, retriever.embed) == []
    assert [c.supported for c in check_support("int8 is fine.", [], retriever.embed)] == [False]


def test_answer_stats_read_the_same_everywhere_and_survive_the_wire() -> None:
    cut = AnswerStats(ttft_s=0.31, tokens=42, tokens_per_s=24.1, weights_mib=256.6, stop="cancelled")
    line = "bf16 · TTFT 0.31 s · 42 tokens · 24.1 tok/s · weights 256.6 MiB · cancelled"
    assert cut.describe("bf16") == line
    assert STATS.describe() == "TTFT 0.2 s · 12 tokens · 30 tok/s · weights 256 MiB"
    assert AnswerStats().describe("nf4") == "nf4 · TTFT – s · 0 tokens · – tok/s · weights – MiB"
    looped = AnswerStats(ttft_s=0.15, tokens=51, tokens_per_s=70.0, weights_mib=256.6, stop="loop")
    assert looped.describe().endswith("· stopped: it was repeating itself")
    data = json.loads(json.dumps(cut.as_dict()))
    assert data["cancelled"] is True and data["stop"] == "cancelled"
    assert AnswerStats.from_dict({**data, "added_later": 1}) == cut


def test_a_question_from_a_field_elsewhere_is_declined_and_named(retriever: Retriever) -> None:
    # Close to the lessons' sentences about bits, but about audio: declined, with the field named.
    model = FakeModel("Record at 24-bit.")
    result = answer("What bit depth should I record my band at?", retriever, model, lesson_id=SEED)
    assert model.calls == [] and not result.grounded
    assert result.answer.startswith(f"{DECLINE} It reads as a question about ")
    assert "audio" in result.answer and "closest sections" in result.answer
    # The same words asked of the lessons' subject are answered.
    asked = answer("What bit width should I quantize my model to?", retriever, None, lesson_id=SEED)
    assert asked.grounded
