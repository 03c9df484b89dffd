"""Retrieval: stable chunk anchors (body and front matter), the per-lesson index cache, search."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SEED
from tutor.assistant import embedder
from tutor.assistant.chunks import FRONT_MATTER, PRACTICE, Chunk, lesson_chunks
from tutor.assistant.hits import SearchResult
from tutor.assistant.retrieval import Retriever
from tutor.library.content import Library, load_library
from tutor.text import content_tokens, slug, tokenize


@pytest.fixture(scope="session")
def retriever(shared_retriever: Retriever) -> Retriever:
    """conftest's session retriever: loaded once, its index in a session temp dir."""
    return shared_retriever


# --- chunks and anchors -------------------------------------------------------------------


def library_chunks(library: Library) -> list[Chunk]:
    return [c for lesson in library.ordered() for c in lesson_chunks(lesson)]


def test_tokenizer_keeps_quant_names() -> None:
    tokens = tokenize("Is int8 better than Q4_K_M for a 7B model? LLM.int8() uses 3.5 GB.")
    for token in ["int8", "q4_k_m", "q4", "7b", "llm.int8", "3.5"]:
        assert token in tokens
    assert "is" not in content_tokens("Is int8 good?")
    assert content_tokens("saving") == content_tokens("saves") == content_tokens("save")


def test_embedded_text_drops_emphasis_but_keeps_names_whole() -> None:
    from tutor.assistant.chunks import plain_markdown

    text = "Types such as **IQ4_XS**, `desc_act` and Q4_K_M, _emphasis_ and __strong__ *it*."
    assert plain_markdown(text) == "Types such as IQ4_XS, desc_act and Q4_K_M, emphasis and strong it."


def test_a_name_in_a_passage_body_is_found_by_its_words(retriever: Retriever) -> None:
    # IQ4_XS is named in the body of "Below 4 bits", not in its heading.
    result = retriever.search("how many bits per weight is IQ4_XS?", lesson_id="fp16-q8-q6-q5-q4")
    assert "Below 4 bits: Q3_K, Q2_K and IQ quants" in [h.section for h in result.hits]


def test_chunks_have_stable_unique_anchors(library: Library) -> None:
    chunks = library_chunks(library)
    again = library_chunks(load_library())
    assert [c.anchor for c in chunks] == [c.anchor for c in again]
    assert len({c.anchor for c in chunks}) == len(chunks)
    for chunk in chunks:
        assert chunk.anchor == f"{chunk.lesson_id}#{slug(chunk.section)}/{chunk.paragraph}"
        assert chunk.text.strip()
        if chunk.section not in FRONT_MATTER:
            assert chunk.text.split("\n\n")[0] in library.get(chunk.lesson_id).body
    # Every section with text is covered, and the front matter's parts, and nothing else.
    for lesson in library.ordered():
        with_text = {s.heading for s in lesson.sections if s.body}
        assert {c.section for c in chunks if c.lesson_id == lesson.id} == with_text | set(FRONT_MATTER)
        mine = [c for c in chunks if c.lesson_id == lesson.id]
        assert [c.text for c in mine if c.section == PRACTICE] == [
            f"**Step {i}, {step.title}**: {step.prompt}" for i, step in enumerate(lesson.meta.practice, 1)
        ]
        assert sum(c.section == "Key terms" for c in mine) == len(lesson.meta.key_terms)


def test_tables_and_code_stay_whole(library: Library) -> None:
    chunks = [c for c in library_chunks(library) if c.lesson_id == SEED]
    table = [c for c in chunks if c.text.lstrip().startswith("|")]
    assert len(table) == 1 and table[0].section == "How much memory quantization saves"
    assert table[0].text.count("\n") == 5  # header, rule and four rows
    fp16 = [c for c in library_chunks(library) if c.section == "Perplexity and KL divergence with llama.cpp"]
    fenced = [c for c in fp16 if "```" in c.text]
    assert len(fenced) == 1 and fenced[0].text.count("```") == 2
    assert fenced[0].text.startswith("llama.cpp's `llama-perplexity` tool")  # with its intro line


def test_anchors_survive_an_edit_elsewhere(tmp_path: Path) -> None:
    content = tmp_path / "content"
    shutil.copytree(ROOT / "content", content)
    before = library_chunks(load_library(content))
    lesson = content / SEED / "lesson.md"
    text = lesson.read_text(encoding="utf-8")
    lesson.write_text(
        text.replace("Throughput, the tokens generated", "Throughput, the number of tokens made")
    )
    after = library_chunks(load_library(content))
    assert [c.anchor for c in before] == [c.anchor for c in after]
    changed = [a.anchor for a, b in zip(before, after, strict=True) if a.text != b.text]
    assert changed == [f"{SEED}#what-quantization-does-well/2"]


# --- search ---------------------------------------------------------------------------------


def test_results_name_lesson_and_section(retriever: Retriever, library: Library) -> None:
    result = retriever.search("Is 4-bit good enough for a chatbot?", lesson_id=SEED)
    assert isinstance(result, SearchResult) and result.covered
    assert 1 <= len(result.hits) <= 3
    for hit in result.hits:
        lesson = library.get(hit.lesson_id)
        assert hit.lesson_title == lesson.title
        assert lesson.section(hit.section) is not None
        assert hit.anchor.startswith(f"{hit.lesson_id}#{slug(hit.section)}/")
        assert hit.text and -1.0 <= hit.cosine <= 1.0 and hit.score > 0
        assert hit.as_dict()["lesson"] == hit.lesson_id
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert len({(h.lesson_id, h.section) for h in result.hits}) == len(result.hits)  # one hit per section


def test_current_lesson_is_preferred(retriever: Retriever) -> None:
    question = "How do FP16 and BF16 split their 16 bits?"
    for lesson_id in ["fp16-q8-q6-q5-q4", "gguf-awq-gptq-decision"]:
        result = retriever.search(question, lesson_id=lesson_id)
        assert result.hits[0].lesson_id == lesson_id
        assert result.hits[0].section.startswith("FP16 and BF16")


def test_practice_steps_are_never_found_by_similarity(retriever: Retriever) -> None:
    # Step 1 of the seed lesson asks the learner to "explain quantization in plain language".
    result = retriever.search("Explain quantization in plain language.", lesson_id=SEED)
    assert result.covered and PRACTICE not in {h.section for h in result.closest}
    assert [h.section for h in retriever.section_hits(SEED, PRACTICE)] == [PRACTICE] * 3


def test_declines_and_points_to_the_closest(retriever: Retriever) -> None:
    result = retriever.search("What's a good recipe for banana bread?", lesson_id=SEED)
    assert not result.covered and result.hits == []
    assert len(result.closest) == 3 and result.best_cosine < 0.3
    blank = retriever.search("  \x1b[31m \n")
    assert not blank.covered and blank.closest == []


def test_query_text_is_cleaned(retriever: Retriever) -> None:
    result = retriever.search("\x1b[1mWhat is [bold]NF4[/bold]?\x07")
    assert "\x1b" not in result.query and "\x07" not in result.query
    assert "[bold]" in result.query  # kept literally; rendering is the widget's job
    assert all("\x1b" not in h.text for h in result.closest)


# --- the on-disk index ----------------------------------------------------------------------


def test_index_is_cached_per_lesson_and_rebuilt_for_a_changed_lesson_only(tmp_path: Path) -> None:
    content = tmp_path / "content"
    other = "hermes-q4-vs-q8"  # two lessons keep the test quick
    for lesson_id in (SEED, other):
        shutil.copytree(ROOT / "content" / lesson_id, content / lesson_id)
    cache = tmp_path / "cache"
    index = cache / "index"
    messages: list[tuple[str, float]] = []

    first = Retriever.load(
        load_library(content), progress=lambda m, f: messages.append((m, f)), cache_dir=cache
    )
    assert first.embedded == len(first.chunks) and sorted(first.embedded_lessons) == sorted([SEED, other])
    assert messages and messages[-1][1] == 1.0
    files = {p.name.split(".")[0]: p for p in index.iterdir()}
    assert sorted(files) == sorted([SEED, other]) and {p.suffix for p in files.values()} == {".npz"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in index.iterdir()}

    second = Retriever.load(load_library(content), cache_dir=cache)
    assert second.embedded == 0 and second.embedded_lessons == []
    assert second.embedder.model is None, "with the index on disk the model waits for the first question"
    assert {p.name: p.stat().st_mtime_ns for p in index.iterdir()} == mtimes
    assert second.chunks == first.chunks and (second.vectors == first.vectors).all()
    query = "Why do quantized models feel faster?"
    assert [h.anchor for h in second.search(query).hits] == [h.anchor for h in first.search(query).hits]

    # An edited lesson is embedded again, alone; its stale file goes, the other lesson's stays.
    lesson = content / SEED / "lesson.md"
    lesson.write_text(lesson.read_text(encoding="utf-8").replace("huge collection", "vast collection"))
    third = Retriever.load(load_library(content), cache_dir=cache)
    assert third.embedded_lessons == [SEED]
    assert third.embedded == sum(c.lesson_id == SEED for c in third.chunks)
    assert any("vast collection" in c.text for c in third.chunks)
    now = {p.name: p.stat().st_mtime_ns for p in index.glob("*.npz")}
    assert len(now) == 3 and now[files[other].name] == mtimes[files[other].name]
    assert not list(index.glob("*.tmp")), "no temp files left"
    # The fields elsewhere were embedded at the first search and are read back since.
    assert [p.name.split(".")[0] for p in index.glob("_elsewhere.*.npz")] == ["_elsewhere"]
    third.search(query)  # the second run asked it: read back from the texts kept (text_vectors)
    assert third.embedded == sum(c.lesson_id == SEED for c in third.chunks)
    third.search("What does a quality cliff look like?")
    assert third.embedded == sum(c.lesson_id == SEED for c in third.chunks) + 1  # the new query alone

    # A damaged file is not trusted: that lesson is embedded again.
    files[other].write_bytes(b"not numpy")
    fourth = Retriever.load(load_library(content), cache_dir=cache)
    assert fourth.embedded_lessons == [other]
    assert fourth.embedded == sum(c.lesson_id == other for c in fourth.chunks)
    assert np.allclose(fourth.vectors, third.vectors, atol=1e-5)  # batched with other passages before


def test_embed_returns_unit_vectors(retriever: Retriever) -> None:
    vectors = retriever.embed(["int8 is near-lossless", "NF4 is a 4-bit format"])
    assert vectors.shape == (2, retriever.vectors.shape[1])
    assert abs(float((vectors**2).sum(axis=1).max()) - 1.0) < 1e-4
    assert retriever.embed([]).shape[0] == 0


def test_importing_the_domain_does_not_import_torch() -> None:
    code = (
        "import sys, tutor.assistant.retrieval, tutor.assistant.grounding; "
        "heavy = {'torch', 'sentence_transformers', 'transformers'} & set(sys.modules); "
        "sys.exit(sorted(heavy) or 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_memo_starts_over_without_losing_the_texts_of_the_call(
    shared_retriever: Retriever, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedder, "MEMO_SIZE", 3)
    first = shared_retriever.embed(["alpha one", "beta two"])
    # One text remembered, two new: the memo overflows and starts over mid-call.
    again = shared_retriever.embed(["alpha one", "gamma three", "delta four"])
    assert again.shape == (3, first.shape[1])
    assert np.allclose(again[0], first[0], atol=1e-6)


def test_a_released_embedder_loads_its_model_again_and_embeds_the_same() -> None:
    """The Lab lets the embedding model go while it measures what embeds nothing."""
    from tutor.assistant.embedder import MemoEmbedder

    embedder = MemoEmbedder()
    before = embedder.embed(["What does NF4 store?"])
    embedder.release()
    assert embedder.model is None and not embedder._memo
    again = embedder.embed(["What does NF4 store?"])
    assert embedder.model is not None
    assert np.allclose(again, before, atol=1e-6)


def test_fields_elsewhere_are_compared_with_the_closest_passage() -> None:
    from tutor.assistant.elsewhere import ELSEWHERE, ELSEWHERE_MARGIN, field_of

    fields = np.eye(len(ELSEWHERE), 4 + len(ELSEWHERE), dtype=np.float32)
    query = fields[2] * 0.6
    assert field_of(query, fields, 0.6 - ELSEWHERE_MARGIN) == ELSEWHERE[2]
    assert field_of(query, fields, 0.6 - ELSEWHERE_MARGIN / 2) == ""
    assert field_of(query, fields[:0], 0.0) == ""
