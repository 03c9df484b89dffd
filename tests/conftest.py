"""Shared fixtures: every test gets its own QUANT_TUTOR_HOME, so no test touches real progress."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tutor.content import Library, load_library
from tutor.store import Store

ROOT = Path(__file__).resolve().parent.parent
SEED = "quantization-8bit-4bit"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "qt-home"
    monkeypatch.setenv("QUANT_TUTOR_HOME", str(path))
    monkeypatch.delenv("NO_COLOR", raising=False)
    return path


@pytest.fixture(scope="session")
def library() -> Library:
    return load_library()


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    store = Store()
    yield store
    store.close()
