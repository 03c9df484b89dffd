"""The Lab tab on the real model: a measured result shown as table, chart and method; compare."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from textual.widgets import DataTable
from textual_plotext import PlotextPlot

from tui.app import QuantTutorApp
from tui.tutor_runtime import READY, TutorRuntime
from tui.widgets.lab_view import LAB_PRECISIONS, LabView
from tui.widgets.plain import Plain
from tutor.content import Library
from tutor.lab import run_cliff
from tutor.store import Store

pytestmark = pytest.mark.model


async def test_lab_shows_measurements_and_compares(  # type: ignore[no-untyped-def]
    library: Library, store: Store, bf16_engine, shared_retriever, tmp_path: Path
) -> None:
    result = run_cliff(bf16_engine, library, LAB_PRECISIONS, max_windows=1, window=128, folder=tmp_path)
    assert [r.precision for r in result.rows] == LAB_PRECISIONS
    runtime = TutorRuntime(library, state=READY, engine=bf16_engine, retriever=shared_retriever)
    app = QuantTutorApp(library, store, tutor=runtime)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("b")
        lab = app.screen.query_one(LabView)
        lab._show(result)
        await pilot.pause()
        table = lab.query_one("#lab-table", DataTable)
        assert table.row_count == 4
        assert table.get_row_at(0)[0] == "bf16" and table.get_row_at(1)[4] == f"{result.rows[1].kl_mean:.4f}"
        assert lab.query_one(PlotextPlot).display
        method = str(lab.query_one("#lab-method", Plain).visual)
        assert "second half" in method and "Machine:" in method and "Q4_1" in method

        await pilot.press("c", *"Is int8 near-lossless?", "enter")
        deadline = time.monotonic() + 400
        while "waiting" in str(lab.query_one("#col-fp4 Plain", Plain).visual):
            assert time.monotonic() < deadline
            await pilot.pause(0.3)
        columns = [str(lab.query_one(f"#col-{p} Plain", Plain).visual) for p in LAB_PRECISIONS]
        assert columns[0].startswith("bf16 (reference)") and "«" not in columns[0]
        assert all("TTFT" in column for column in columns)
        await pilot.pause(0.5)
        assert bf16_engine.precision == "bf16", "compare puts the precision back"
