"""Retrieval: stable chunk anchors, the on-disk index cache, and the evaluation set's figures."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, SEED
from tutor.content import Library, load_library
from tutor.retrieval import Retriever, SearchResult, content_tokens, library_chunks, slug, tokenize

EVAL_FILE = ROOT / "content" / "eval_questions.yaml"


@pytest.fixture(scope="session")
def retriever(shared_retriever: Retriever) -> Retriever:
    """conftest's session retriever: loaded once, its index in a session temp dir."""
    return shared_retriever


@pytest.fixture(scope="session")
def eval_set() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EVAL_FILE.read_text(encoding="utf-8"))
    return data


def golds(item: dict[str, Any]) -> set[tuple[str, str]]:
    return {(item["lesson"], item["section"])} | {(g["lesson"], g["section"]) for g in item.get("also", [])}


@dataclass
class Figures:
    on_lesson: int = 0
    hit_with_lesson: int = 0
    hit_without_lesson: int = 0
    wrongly_declined: int = 0
    off_topic: int = 0
    declined: int = 0
    misses: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (
            f"retrieval eval: {self.on_lesson} on-lesson questions, {self.off_topic} off-topic\n"
            f"  hit@3 asked from the lesson:   {self.hit_with_lesson / self.on_lesson:.3f}\n"
            f"  hit@3 asked with no lesson:    {self.hit_without_lesson / self.on_lesson:.3f}\n"
            f"  on-topic wrongly declined:     {self.wrongly_declined / self.on_lesson:.3f}\n"
            f"  off-topic declined:            {self.declined / self.off_topic:.3f}\n"
            f"  misses: {self.misses}\n  off-topic answered: {self.leaks}"
        )


@pytest.fixture(scope="module")
def figures(retriever: Retriever, eval_set: dict[str, Any]) -> Figures:
    result = Figures()
    for item in eval_set["on_lesson"]:
        result.on_lesson += 1
        asked_here = retriever.search(item["question"], k=3, lesson_id=item["lesson"])
        asked_anywhere = retriever.search(item["question"], k=3)
        here = {(h.lesson_id, h.section) for h in asked_here.closest}
        anywhere = {(h.lesson_id, h.section) for h in asked_anywhere.closest}
        result.hit_with_lesson += bool(golds(item) & here)
        result.hit_without_lesson += bool(golds(item) & anywhere)
        result.wrongly_declined += not asked_here.covered
        if not golds(item) & here or not asked_here.covered:
            result.misses.append(item["question"])
    for question in eval_set["off_topic"]:
        result.off_topic += 1
        declined = not retriever.search(question).covered
        result.declined += declined
        if not declined:
            result.leaks.append(question)
    print("\n" + result.report())
    return result


# --- the evaluation set -----------------------------------------------------------------


def test_eval_set_is_well_formed(eval_set: dict[str, Any], library: Library) -> None:
    on, off = eval_set["on_lesson"], eval_set["off_topic"]
    assert len(on) >= 40 and len(off) >= 15
    per_lesson = {lesson_id: sum(q["lesson"] == lesson_id for q in on) for lesson_id in library.lessons}
    assert all(count >= 5 for count in per_lesson.values()), per_lesson
    assert max(per_lesson, key=lambda lesson_id: per_lesson[lesson_id]) == SEED
    for item in on:
        for lesson_id, section in golds(item):
            found = library.get(lesson_id).section(section)
            assert found is not None and found.heading == section, (lesson_id, section)
        # Learners' words, not the heading copied.
        if len(item["section"].split()) >= 3:
            assert item["section"].casefold() not in item["question"].casefold()
    assert len({q["question"] for q in on}) == len(on)
    for claim in eval_set["claims"]:
        assert library.get(claim["lesson"]).section(claim["section"]) is not None
    assert {c["supported"] for c in eval_set["claims"]} == {True, False}


def test_hit_at_3(figures: Figures) -> None:
    assert figures.hit_with_lesson / figures.on_lesson >= 0.9, figures.report()
    assert figures.hit_without_lesson / figures.on_lesson >= 0.9, figures.report()


def test_off_topic_declined(figures: Figures) -> None:
    assert figures.declined / figures.off_topic >= 0.9, figures.report()


def test_on_topic_rarely_declined(figures: Figures) -> None:
    assert figures.wrongly_declined / figures.on_lesson <= 0.1, figures.report()


# --- chunks and anchors -------------------------------------------------------------------


def test_tokenizer_keeps_quant_names() -> None:
    tokens = tokenize("Is int8 better than Q4_K_M for a 7B model? LLM.int8() uses 3.5 GB.")
    for token in ["int8", "q4_k_m", "q4", "7b", "llm.int8", "3.5"]:
        assert token in tokens
    assert "is" not in content_tokens("Is int8 good?")
    assert content_tokens("saving") == content_tokens("saves") == content_tokens("save")


def test_chunks_have_stable_unique_anchors(library: Library) -> None:
    chunks = library_chunks(library)
    again = library_chunks(load_library())
    assert [c.anchor for c in chunks] == [c.anchor for c in again]
    assert len({c.anchor for c in chunks}) == len(chunks)
    for chunk in chunks:
        assert chunk.anchor == f"{chunk.lesson_id}#{slug(chunk.section)}/{chunk.paragraph}"
        assert chunk.text.strip()
        assert chunk.text.split("\n\n")[0] in library.get(chunk.lesson_id).body
    # Every section with text is covered, and nothing else.
    for lesson in library.ordered():
        with_text = {s.heading for s in lesson.sections if s.body}
        assert {c.section for c in chunks if c.lesson_id == lesson.id} == with_text


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


def test_index_is_cached_and_rebuilt_when_a_lesson_changes(tmp_path: Path) -> None:
    content = tmp_path / "content"
    shutil.copytree(ROOT / "content" / SEED, content / SEED)  # one lesson keeps the test quick
    cache = tmp_path / "cache"
    messages: list[tuple[str, float]] = []

    first = Retriever.load(
        load_library(content), progress=lambda m, f: messages.append((m, f)), cache_dir=cache
    )
    assert not first.from_cache and first.embedded == len(first.chunks)
    assert messages and messages[-1][1] == 1.0
    files = sorted(p.name for p in (cache / "index").iterdir())
    assert len(files) == 2 and {Path(f).suffix for f in files} == {".npy", ".json"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache / "index").iterdir()}

    second = Retriever.load(load_library(content), cache_dir=cache)
    assert second.from_cache and second.embedded == 0 and second.key == first.key
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "index").iterdir()} == mtimes
    assert (second.vectors == first.vectors).all()
    query = "Why do quantized models feel faster?"
    assert [h.anchor for h in second.search(query).hits] == [h.anchor for h in first.search(query).hits]

    lesson = content / SEED / "lesson.md"
    lesson.write_text(lesson.read_text(encoding="utf-8").replace("huge collection", "vast collection"))
    third = Retriever.load(load_library(content), cache_dir=cache)
    assert not third.from_cache and third.key != first.key
    assert len(list((cache / "index").iterdir())) == 2  # the stale pair is gone, no temp files left

    # A damaged cache file is not trusted: the index is rebuilt.
    for npy in (cache / "index").glob("*.npy"):
        npy.write_bytes(b"not numpy")
    fourth = Retriever.load(load_library(content), cache_dir=cache)
    assert not fourth.from_cache and fourth.embedded == len(fourth.chunks)


def test_embed_returns_unit_vectors(retriever: Retriever) -> None:
    vectors = retriever.embed(["int8 is near-lossless", "NF4 is a 4-bit format"])
    assert vectors.shape == (2, retriever.vectors.shape[1])
    assert abs(float((vectors**2).sum(axis=1).max()) - 1.0) < 1e-4
    assert retriever.embed([]).shape[0] == 0


def test_importing_the_domain_does_not_import_torch() -> None:
    code = (
        "import sys, tutor.retrieval, tutor.grounding; "
        "heavy = {'torch', 'sentence_transformers', 'transformers'} & set(sys.modules); "
        "sys.exit(sorted(heavy) or 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
