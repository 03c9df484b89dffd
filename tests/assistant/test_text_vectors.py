"""Texts' embeddings kept across runs (``tutor.assistant.text_vectors``): read back by the next
run instead of embedded again, never another model's, a damaged file moved aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tutor.assistant import text_vectors
from tutor.assistant.embedder import EMBED_DIM, MemoEmbedder, model_id
from tutor.assistant.text_vectors import TextVectors, store_path


def _store(folder: Path, model: str = "") -> TextVectors:
    return TextVectors(store_path(folder, model or model_id()), EMBED_DIM)


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(EMBED_DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_texts_embedded_once_are_read_back_by_the_next_run(tmp_path: Path) -> None:
    first = MemoEmbedder(store=_store(tmp_path))
    vectors = first.embed(["What does NF4 store?", "Why is int8 near-lossless?"])
    assert first.embedded == 2
    # Another run: its memo empty, the same file.
    second = MemoEmbedder(store=_store(tmp_path))
    again = second.embed(["Why is int8 near-lossless?", "What does NF4 store?", "What is GPTQ?"])
    assert second.embedded == 1, "only the new text went through the model"
    assert np.array_equal(again[:2], vectors[::-1])
    assert np.allclose(again[2], first.embed(["What is GPTQ?"])[0], atol=1e-6)
    # Texts not remembered (an index's passages: cached per lesson already) are not kept.
    second.embed(["a passage of the index"], remember=False)
    assert _store(tmp_path).get(["a passage of the index", "What is GPTQ?"]).keys() == {"What is GPTQ?"}
    assert _store(tmp_path, "another-model@1").get(["What does NF4 store?"]) == {}


def test_a_damaged_file_is_moved_aside_and_started_afresh(tmp_path: Path) -> None:
    path = store_path(tmp_path, model_id())
    path.write_bytes(b"not a database at all" * 100)
    store = _store(tmp_path)
    assert store.get(["anything"]) == {}
    store.put({"kept": _unit(1)})
    assert np.array_equal(_store(tmp_path).get(["kept"])["kept"], _unit(1))
    [aside] = tmp_path.glob(f"{path.name}.corrupt-*")
    assert aside.read_bytes() == b"not a database at all" * 100, "moved, not overwritten"
    assert store.problem is None


def test_a_store_out_of_reach_leaves_texts_to_be_embedded(tmp_path: Path) -> None:
    store_path(tmp_path, model_id()).mkdir(parents=True)  # a folder where the file would be
    store = _store(tmp_path)
    assert store.get(["anything"]) == {}
    store.put({"anything": _unit(2)})
    assert store.problem is not None and "unable to open" in store.problem


def test_the_oldest_texts_go_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_vectors, "STORE_LIMIT", 3)
    store = _store(tmp_path)
    store.put({f"text {n}": _unit(n) for n in range(4)})
    store.put({"text 4": _unit(4)})
    assert sorted(store.get(f"text {n}" for n in range(5))) == ["text 2", "text 3", "text 4"]
