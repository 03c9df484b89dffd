"""The precision lab's measurements on the real embedded model (CPU, a few windows)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SEED
from tutor import measure
from tutor.content import Library, load_library
from tutor.diff import departures
from tutor.lab import weight_lab
from tutor.weight_lab import run_lab

pytestmark = pytest.mark.model
WINDOW = 128


def test_reference_against_itself_is_identical(bf16_engine, library: Library) -> None:  # type: ignore[no-untyped-def]
    windows = measure.lesson_windows(bf16_engine.tokenizer, library, WINDOW)[:2]
    tally = measure.score_windows(bf16_engine, windows, ["bf16"])["bf16"]
    assert tally.tokens == 2 * (WINDOW - WINDOW // 2 - 1)
    assert abs(tally.kl / tally.tokens) < 1e-6
    assert tally.same_top == tally.tokens


def test_int8_drifts_less_than_4bit(bf16_engine, library: Library) -> None:  # type: ignore[no-untyped-def]
    windows = measure.lesson_windows(bf16_engine.tokenizer, library, WINDOW)[:2]
    tallies = measure.score_windows(bf16_engine, windows, ["bf16", "int8", "nf4", "fp4"])
    kl = {p: t.kl / t.tokens for p, t in tallies.items()}
    assert 0 < kl["int8"] < kl["nf4"] and kl["int8"] < kl["fp4"]
    assert tallies["int8"].same_top > tallies["nf4"].same_top
    assert bf16_engine.precision == "bf16", "scoring leaves the reference installed"


def test_weight_lab_error_grows_as_bits_drop(bf16_engine, library: Library) -> None:  # type: ignore[no-untyped-def]
    layer, rows = weight_lab(bf16_engine, library, WINDOW)
    assert layer.startswith("model.layers.")
    error = {r.scheme: r.output_rel_rms for r in rows}
    assert error["int8 absmax"] < error["int4 rtn"] < error["int3 rtn"] < error["int2 rtn"]
    assert error["nf4"] < error["int3 rtn"]
    weight_error = {r.scheme: r.weight_rel_rms for r in rows}
    assert weight_error["int8 absmax"] < weight_error["nf4"] < weight_error["int2 rtn"]


def test_weight_lab_on_a_known_matrix() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 256, dtype=torch.bfloat16) * 0.02
    rows = run_lab(weight, torch.randn(32, 256))
    by_bits = sorted(rows, key=lambda r: -r.bits)
    assert by_bits[0].scheme == "int8 absmax" and by_bits[0].weight_rel_rms < 0.01
    assert [r.weight_rel_rms for r in rows if "rtn" in r.scheme] == sorted(
        r.weight_rel_rms for r in rows if "rtn" in r.scheme
    )


def test_results_are_cached_and_invalidated_by_content(  # type: ignore[no-untyped-def]
    bf16_engine, library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = measure.score_windows

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "score_windows", counting)
    first = measure.quality_rows(
        bf16_engine, library, ["bf16", "int8"], window=WINDOW, max_windows=1, folder=tmp_path
    )
    again = measure.quality_rows(
        bf16_engine, library, ["bf16", "int8"], window=WINDOW, max_windows=1, folder=tmp_path
    )
    assert len(calls) == 1 and again == first
    assert first[0].ppl_ratio == 1.0 and first[0].kl_mean == 0.0 and first[0].top1_agreement == 1.0

    content = tmp_path / "content"
    shutil.copytree(ROOT / "content", content)
    lesson = content / SEED / "lesson.md"
    lesson.write_text(
        lesson.read_text().replace("## What quantization is\n", "## What quantization is\n\nNew words.\n")
    )
    measure.quality_rows(
        bf16_engine, load_library(content), ["bf16", "int8"], window=WINDOW, max_windows=1, folder=tmp_path
    )
    assert len(calls) == 2, "changed lesson text is measured again"


def test_token_f1_and_departures() -> None:
    assert measure.token_f1("int8 is near lossless", "int8 is near lossless") == 1.0
    assert measure.token_f1("a b", "c d") == 0.0
    assert 0 < measure.token_f1("int8 keeps quality", "int8 loses quality") < 1
    marked = departures("int8 is near lossless", "int8 is not lossless")
    assert marked == [("int8", False), ("is", False), ("not", True), ("lossless", False)]
