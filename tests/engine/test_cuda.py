"""The engine on a CUDA GPU: every precision, its memory statistics, and a measurement.

These run where ``torch.cuda.is_available()`` and skip cleanly everywhere else (CI and the
2-core development machine have no GPU). On a GPU the memory bound for prepared precisions is
the device's own, so a measurement there must not lose a precision it is still reading.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tutor.lab import measure
from tutor.library.content import Library

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here"),
]

PROMPT = "What does quantization do to a neural network?"
PRECISIONS = ["bf16", "fp32", "int8", "nf4", "fp4"]


@pytest.fixture(scope="module")
def cuda_engine(model_cache: Path):  # type: ignore[no-untyped-def]
    from tutor.engine import Engine

    engine = Engine.load(cache_dir=model_cache, device="cuda")
    yield engine
    engine.close()


def test_each_precision_generates_on_the_gpu_with_its_own_memory_figures(cuda_engine) -> None:  # type: ignore[no-untyped-def]
    sizes = {}
    for precision in PRECISIONS:
        report = cuda_engine.switch(precision, wait=True)
        reply = cuda_engine.generate(PROMPT, max_new_tokens=8)
        stats = reply.stats
        assert stats.precision == precision and stats.device.startswith("cuda")
        assert stats.tokens == 8 and reply.text.strip()
        assert stats.cuda_peak_mib is not None and stats.cuda_peak_mib > 0
        assert stats.weights_mib == report.weights.weights_mib
        sizes[precision] = report.weights.weights_mib
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["nf4"] == sizes["fp4"]
    memory = cuda_engine.memory()
    assert memory["cuda_allocated_mib"] is not None and memory["cuda_allocated_mib"] > 0
    cuda_engine.switch("bf16", wait=True)


def test_bf16_on_the_gpu_agrees_with_the_cpu(cuda_engine, shared_engine) -> None:  # type: ignore[no-untyped-def]
    """Other kernels, same function: greedy tokens agree until a near-tie, logits within bounds."""
    from tests.engine.numerics import TOLERANCES, compare_decodes, engine_logits_along, engine_trace

    shared_engine.switch("bf16", wait=True)
    cuda_engine.switch("bf16", wait=True)
    ids = shared_engine.encode(PROMPT)
    _, cpu = engine_trace(shared_engine, ids, 16)
    _, gpu = engine_trace(cuda_engine, ids, 16)
    result = compare_decodes(
        cpu,
        gpu,
        TOLERANCES["bf16"],
        "bf16 cuda vs cpu",
        along_reference=lambda: engine_logits_along(cuda_engine, ids, cpu.tokens),
    )
    print(result.describe())


@pytest.mark.parametrize("precision", ["bf16", "fp32", "nf4", "fp4", "int8"])
def test_decode_steps_replay_a_cuda_graph_and_decode_as_eager_steps(cuda_engine, precision: str) -> None:  # type: ignore[no-untyped-def]
    """Each token one replay of a recorded graph, the same greedy decode as eager steps (within
    the precision's tolerance), at a short prompt and at one past the smallest cache, and
    context-aware (two rows); LLM.int8 decodes eagerly (its outlier lookup is on the host) and
    says why."""
    from tests.engine.numerics import graph_against_eager
    from tutor.engine.bench_rows import long_prompt_ids
    from tutor.engine.graphs import SMALLEST_CACHE

    cuda_engine.switch(precision, wait=True)
    for ids in (cuda_engine.encode(PROMPT), long_prompt_ids(cuda_engine, SMALLEST_CACHE + 100)):
        reply, comparison = graph_against_eager(cuda_engine, ids, 16)
        print(comparison.describe())
        weights = cuda_engine._current_weights()
        if precision == "int8":
            assert reply.stats.decoder == "fast" and "LLM.int8" in str(weights.graph_problem)
        else:
            assert reply.stats.decoder == "graph", weights.graph_problem
            assert all(step.graph is not None for step in weights.steps.values())
    if precision != "int8":
        assert sorted(cuda_engine._current_weights().steps) == [(1, SMALLEST_CACHE), (1, 2 * SMALLEST_CACHE)]
    passages = "Passages:\n[1] NF4 and FP4: NF4 usually preserves quality better than FP4.\n\n"
    question = "Question: Which 4-bit type keeps quality better?"
    contrast = {"contrast": [{"role": "user", "content": question}], "alpha": 1.0}
    held, comparison = graph_against_eager(
        cuda_engine, cuda_engine.encode(passages + question), 16, **contrast
    )
    print(comparison.describe())
    assert held.stats.decoder == ("fast+cad" if precision == "int8" else "graph+cad")
    cuda_engine.switch("bf16", wait=True)


def test_a_measurement_scores_every_precision_on_the_gpu(  # type: ignore[no-untyped-def]
    cuda_engine, library: Library, tmp_path: Path
) -> None:
    kwargs = {"window": 128, "max_windows": 4, "batch_size": 2, "folder": tmp_path}
    rows = measure.quality_rows(cuda_engine, library, PRECISIONS, **kwargs)
    assert [r.precision for r in rows] == PRECISIONS
    assert rows[0].kl_mean == 0 and rows[0].top1_agreement == 1
    for row in rows[1:]:
        assert row.weights_mib > 0 and row.kl_mean >= 0 and 0 < row.top1_agreement <= 1
    assert cuda_engine.precision == "bf16"


def test_a_prompts_memory_on_the_gpu(cuda_engine) -> None:  # type: ignore[no-untyped-def]
    ids = cuda_engine.encode(PROMPT)
    kv, peak = cuda_engine.prefill_footprint(ids)
    kv2, _ = cuda_engine.prefill_footprint(ids + ids)
    assert kv2 == 2 * kv > 0 and peak > 0


def test_bench_sets_graph_replays_beside_eager_steps_and_generate(cuda_engine) -> None:  # type: ignore[no-untyped-def]
    """``bench --eager --plain`` on the GPU: the graph reply, the same reply with eager steps and
    transformers' generate, in one row: what the next GPU table can come from."""
    from tutor.engine.bench_rows import bench_rows

    cuda_engine.switch("bf16", wait=True)
    row = bench_rows(
        ["bf16"], tokens=16, engine=cuda_engine, reload=False, long_prompt=0, eager=True, plain=True
    )[0]
    print({k: row[k] for k in ("decoder", "decode_tok_s", "eager_decode_tok_s", "plain_decode_tok_s")})
    assert row["decoder"] == "graph" and cuda_engine.cuda_graphs
    assert row["decode_tok_s"] > 0 and row["eager_decode_tok_s"] > 0 and row["plain_decode_tok_s"] > 0
