"""The Lab tab on the real engine process: live rows, Esc stops, a measured result shown whole; compare."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, ProgressBar
from textual_plotext import PlotextPlot

from tests.conftest import until
from tui.app import QuantTutorApp
from tui.widgets.lab_view import LAB_PRECISIONS, LabView
from tui.widgets.plain import Plain
from tutor.lab.cliff import Plan, run_cliff
from tutor.library.content import Library
from tutor.progress.store import Store

pytestmark = pytest.mark.model


async def test_m_measures_live_and_escape_stops(  # type: ignore[no-untyped-def]
    library: Library, store: Store, engine_runtime
) -> None:
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("b")
        lab = app.screen.query_one(LabView)
        bar = lab.query_one("#lab-progress", ProgressBar)
        # Hidden and not indeterminate: such a bar redraws itself 15 times a second.
        assert not bar.display and bar.percentage is not None
        lab.focus()
        await pilot.press("m")
        status = lab.query_one("#lab-status", Plain)
        await until(pilot, lambda: "Measuring (quick)" in str(status.visual))
        assert "Press m" not in str(status.visual)
        table = lab.query_one("#lab-table", DataTable)
        # The reference row arrives on its own, before the measurement is over.
        await until(pilot, lambda: table.row_count >= 1)
        assert lab.measuring and table.get_row_at(0)[0] == "bf16"
        await pilot.press("escape")
        await until(pilot, lambda: not lab.measuring, 60)
        assert "stopped" in str(status.visual)
        assert not bar.display and bar.percentage is not None
        await pilot.press("e")  # the claims: the same table first, then each claim
        await until(pilot, lambda: "Measuring (claims)" in str(status.visual))
        await pilot.press("escape")
        await until(pilot, lambda: not lab.measuring, 60)
        assert "stopped" in str(status.visual)


async def test_lab_shows_a_result_and_compares(  # type: ignore[no-untyped-def]
    library: Library, store: Store, bf16_engine, engine_runtime, tmp_path: Path
) -> None:
    small = Plan(
        "small",
        windows=None,
        qa_questions=0,
        quiz_questions=1,
        continuations=1,
        long_tokens=8,
        contexts=(8,),
        mixed_windows=0,  # test_measure.py's tiny plan measures that section
        calibrate=False,
    )
    result = run_cliff(
        bf16_engine, library, LAB_PRECISIONS, plan=small, max_windows=1, window=128, folder=tmp_path
    )
    assert [r.precision for r in result.rows] == LAB_PRECISIONS
    app = QuantTutorApp(library, store, tutor=engine_runtime)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("b")
        lab = app.screen.query_one(LabView)
        lab._show(result.as_dict())
        await pilot.pause()
        table = lab.query_one("#lab-table", DataTable)
        assert table.row_count == 4
        assert table.get_row_at(0)[0] == "bf16" and table.get_row_at(1)[4] == f"{result.rows[1].kl_mean:.4f}"
        assert lab.query_one(PlotextPlot).display
        method = str(lab.query_one("#lab-method", Plain).visual)
        assert "second half" in method and "Machine:" in method and "Q4_1" in method
        section = lab.query_one("#lab-no-way-back")
        assert section.query_one(DataTable).get_row_at(2)[0] == "NF4→bf16"
        assert "brings nothing back" in str(section.query(Plain).last().visual)
        assert "NF4→bf16: the NF4 weights dequantized" in method
        hard = lab.query_one("#lab-easy-hard")
        assert [hard.query_one(DataTable).get_row_at(i)[0] for i in range(4)] == LAB_PRECISIONS
        assert hard.query_one(PlotextPlot).display and "Easy vs hard: 1 quiz question as" in method
        held = lab.query_one("#lab-memory")
        assert held.query_one(DataTable).row_count == 4 and "weight bits shrink only" in str(
            held.query(Plain).last().visual
        )

        # The reference answered, then Esc while int8 answers: the rest say so and the engine is
        # free at once.
        def column(precision: str) -> str:
            return str(lab.query_one(f"#col-{precision} Plain", Plain).visual)

        def on_screen(widget_id: str) -> bool:
            """Whether the top of the lab's child ``widget_id`` is inside the lab's view."""
            top = lab.query_one(widget_id).virtual_region.y
            return lab.scroll_y <= top < lab.scroll_y + lab.scrollable_content_region.height

        client = engine_runtime.client
        # Below the measured result, the question box and the answers scroll into view.
        await pilot.press("c")
        await pilot.pause()
        assert not on_screen("#lab-table") and on_screen("#lab-question")
        await pilot.press(*"What does KL divergence measure?", "enter")  # short answers
        await until(pilot, lambda: "waiting" not in column("bf16"))
        await pilot.pause()
        assert on_screen("#lab-question") and on_screen("#lab-compare")
        assert column("bf16").startswith("bf16 (reference)") and "«" not in column("bf16")
        assert "TTFT" in column("bf16") and "int8: waiting" in column("int8")
        await until(pilot, lambda: "int8" in client.status().get("prepared", []) and client.status()["job"])
        await pilot.press("escape")
        await until(pilot, lambda: "waiting" not in column("fp4"), 60)
        assert [column(p) for p in LAB_PRECISIONS[1:]] == [f"{p}: stopped" for p in LAB_PRECISIONS[1:]]
        # Closing the stream cancelled the int8 answer in flight: the engine is free within a token.
        await until(pilot, lambda: not client.status()["job"], 10)
        assert engine_runtime.precision == "bf16", "each compared answer named its own precision"
