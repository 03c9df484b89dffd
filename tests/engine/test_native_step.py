"""The native decode step (``tutor.engine.native_step``) against the Python loop it stands in
for: the same operations in the same order, so the same logits bit for bit, one row or a
batch of rows with padding, with the kernels it calls itself (bf16, nf4, int8, int8-wo, int4)
and slots it calls back in Python (taps). And the kernels that read a prompt (``prefill.cpp``):
attention against SDPA and float32, int4's unpacked weight against the Python's. And the
few-row products for CPUs without bf16 matmul (``matvec.cpp``) against float32 products, and
LLM.int8's linear (``llm_int8.cpp``) against bitsandbytes' module."""

from __future__ import annotations

import pytest
import torch

from tutor.engine.sessions import prefill_rows

pytestmark = pytest.mark.model

PROMPTS = ("What does quantization do to a neural network?", "Is int8 near-lossless?")


@pytest.fixture
def engine(shared_engine):  # type: ignore[no-untyped-def]
    shared_engine.switch("bf16", wait=True)
    yield shared_engine
    shared_engine.native_step = True
    shared_engine.switch("bf16", wait=True)


def test_the_native_step_is_built_and_runs_here(engine) -> None:  # type: ignore[no-untyped-def]
    from tutor.engine import native_step

    # Built into the session's cache by the engine's load; a machine with a compiler builds it.
    assert native_step.problem() is None and engine.native_step
    reply = engine.generate(PROMPTS[0], max_new_tokens=4)
    assert reply.stats.decoder == "native"
    engine.native_step = False
    python = engine.generate(PROMPTS[0], max_new_tokens=4)
    assert python.stats.decoder == "fast" and python.tokens == reply.tokens


def _steps(engine, rows: list[list[int]], native: bool, count: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Logits of ``count`` greedy steps after the prompts ``rows`` (one batch), native or not."""
    decoder, weights = engine._decoder, engine._current_weights()
    decoder.use_native = True  # the same prompt attention either way: the steps are compared
    cache = decoder.new_cache(64, weights.act_dtype, batch=len(rows))
    with torch.no_grad():
        logits, pads = prefill_rows(decoder, weights, cache, rows)
        decoder.use_native = native
        pad = torch.tensor(pads) if len(rows) > 1 else None
        out = []
        for _ in range(count):
            tokens = torch.stack([row.argmax(-1) for row in logits]).view(len(rows), 1)
            logits = decoder.forward(weights, tokens, cache, pad=pad)
            out.append(logits)
    return out


@pytest.mark.parametrize("precision", ["bf16", "nf4", "int8", "int8-wo", "int4"])
def test_native_steps_give_the_python_loops_logits_bit_for_bit(engine, precision: str) -> None:  # type: ignore[no-untyped-def]
    engine.switch(precision, wait=True)
    one = [engine.encode(PROMPTS[0])]
    two = [engine.encode(p) for p in PROMPTS]  # different lengths: the shorter row is padded
    for rows in (one, two):
        native, python = (_steps(engine, rows, on, 6) for on in (True, False))
        for step, (a, b) in enumerate(zip(native, python, strict=True)):
            assert torch.equal(a, b), (precision, len(rows), step, (a.float() - b.float()).abs().max())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("batch", "steps"), [(1, 1), (1, 37), (1, 128), (1, 300), (2, 150)])
def test_a_prompts_native_attention_is_as_close_to_float32_as_sdpas(engine, batch: int, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Causal, grouped (9 query heads on 3 key heads, as SmolLM2), over chunks of 128 queries
    and a last one shorter; scores large enough that bf16 rounding of them would show."""
    from tutor.engine.attention import PROMPT_CHUNK

    native = engine._decoder.native
    generator = torch.Generator().manual_seed(steps)
    q, k, v = (
        (torch.randn(batch, heads, steps, 64, generator=generator) * scale).bfloat16()
        for heads, scale in ((9, 3.0), (3, 3.0), (3, 1.0))
    )
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, scale=0.125, enable_gqa=True
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.125, enable_gqa=True
    )
    ours = native.prefill_attention(q, k, v, 0.125, PROMPT_CHUNK)
    assert ours.shape == q.shape and ours.dtype == torch.bfloat16
    # bf16 output: its rounding alone is ~2e-3 relative; a score rounded to bf16 would be ~1e-2.
    assert _relative(ours, exact) <= max(1.5 * _relative(sdpa, exact), 4e-3)


@pytest.mark.parametrize("padded", [False, True])
def test_a_decode_steps_native_attention_is_the_float32_ops_result(engine, padded: bool) -> None:  # type: ignore[no-untyped-def]
    """One new position per row over the cache as the decoder holds it (a view of a longer
    buffer), grouped heads, a padded row's first positions hidden: the float32 ATen ops'
    result up to their order of summation, then bf16 rounding."""
    from tutor.engine.attention import pad_mask

    native = engine._decoder.native
    generator = torch.Generator().manual_seed(7)
    rows, end = (2, 29) if padded else (1, 300)
    cache = (torch.randn(2, rows, 3, end + 11, 64, generator=generator) * 2).bfloat16()
    k, v = cache[0, :, :, :end], cache[1, :, :, :end]
    q = (torch.randn(rows, 1, 15, 64, generator=generator) * 2).bfloat16()[:, :, :9].transpose(1, 2)
    mask = pad_mask(torch.tensor([0, 5]), end - 1, end) if padded else None
    grouped = q.reshape(rows, 3, 3, 64).float()
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)) * 0.125
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    exact = torch.matmul(scores.softmax(-1), v.float()).reshape(rows, 9, 1, 64)
    ours = native.decode_attention(q, k, v, mask, 0.125)
    assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), exact, rtol=2**-8, atol=1e-3)
    if padded:  # what a hidden position holds does not matter
        cache[:, 1, :, :5] = 1e4
        assert torch.equal(native.decode_attention(q, k, v, mask, 0.125), ours)


def test_a_prompt_read_with_native_attention_is_as_close_to_float32_as_with_sdpa(engine) -> None:  # type: ignore[no-untyped-def]
    """A whole bf16 prompt read (246 tokens, every position's logits) against the same read at
    float32: the native attention no further off than SDPA (here 0.0156 against 0.0162)."""
    ids = torch.tensor([engine.encode(" ".join(PROMPTS * 12))])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return engine._decoder.forward(engine._current_weights(), ids, None, last_only=False)[0].float()

    from tutor.engine.linears import bf16_matmul_is_emulated

    decoder = engine._decoder
    if bf16_matmul_is_emulated():
        pytest.skip("this CPU only emulates bf16 matmul: SDPA reads a prompt (decoder.native_prompt)")
    assert decoder.native_prompt(torch.bfloat16), "bf16 on this CPU: the prompt's attention is native"
    runs = {}
    for on in (True, False):
        decoder.use_native = on
        runs[on] = logits()
    decoder.use_native = True
    engine.switch("fp32", wait=True)
    exact = logits()
    native, sdpa = (_relative(runs[on], exact) for on in (True, False))
    assert native <= 1.1 * sdpa, (native, sdpa)

    def agree(run: torch.Tensor) -> float:
        return float((run.argmax(-1) == exact.argmax(-1)).float().mean())

    assert agree(runs[True]) >= agree(runs[False]) - 2 / ids.shape[1]


def test_int4s_unpacked_weight_is_the_pythons_bit_for_bit(engine) -> None:  # type: ignore[no-untyped-def]
    from tutor.engine.int4 import GROUP, Int4Linear, packed_row_block, round_to_nearest, unpacks

    if not unpacks(2 * packed_row_block()):
        pytest.skip("this CPU packs int4 codes in a layout the prompt path does not read: the kernel serves")
    torch.manual_seed(0)
    codes = round_to_nearest(torch.randn(2 * packed_row_block(), 3 * GROUP) * 0.05)
    module = Int4Linear.from_codes(codes)
    native = module.dequantized(torch.bfloat16)
    assert torch.equal(native, codes.dequantized().to(torch.bfloat16))
    assert native.t().is_contiguous(), "the native kernel's own (K, N) layout"


def _within_bf16_rounding(got: torch.Tensor, exact: torch.Tensor, beside: torch.Tensor | float = 0.0) -> None:
    """``got`` (bf16) is ``exact`` (float32) rounded to bf16, give or take the order of float32
    sums: at most one bf16 step (2**-8 relative) from it, and ``beside`` (a bound on any other
    error)."""
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    worst = ((got.float() - exact).abs() / (exact.abs() * 2**-8 + beside + 1e-6)).max()
    assert worst <= 1.0, worst


@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (70, 40)])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_the_bf16_matvec_is_the_float32_product_rounded_once(engine, n: int, k: int, rows: int) -> None:  # type: ignore[no-untyped-def]
    """In runs of up to four rows, its outputs split between threads; k = 40 is not a whole
    number of the AVX2 kernel's spans (plain code)."""
    native = engine._decoder.native
    generator = torch.Generator().manual_seed(n + rows)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    x = torch.randn(rows, k, generator=generator).bfloat16()
    bias = torch.randn(n, generator=generator).bfloat16()
    exact = x.float() @ weight.float().t()
    _within_bf16_rounding(native.bf16_matvec(x, weight, None), exact)
    _within_bf16_rounding(native.bf16_matvec(x, weight, bias), exact + bias.float())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize(("blocksize", "k"), [(64, 576), (256, 1536)])
def test_the_4bit_matvec_multiplies_bitsandbytes_float32_dequantization(
    engine, quant_type: str, rows: int, blocksize: int, k: int
) -> None:  # type: ignore[no-untyped-def]
    """Each weight is its code's value times its block's absmax in float32, bitsandbytes'
    float32 dequantization of the codes. With AVX2 the code values and each 64 inputs (a span)
    are 14-bit fixed point: each product is then off by at most absmax * (the span's largest
    input) / 16383, on top of the output's rounding to bf16. Blocks of 256 share one absmax
    among four spans (k = 1536: 24 spans, an even number; 576 has 9)."""
    import bitsandbytes as bnb

    from tutor.engine.linears import _absmax

    native = engine._decoder.native
    generator = torch.Generator().manual_seed(rows)
    master = torch.randn(640, k, generator=generator) * 0.05
    codes, state = bnb.functional.quantize_4bit(master, blocksize=blocksize, quant_type=quant_type)
    dequantized = bnb.functional.dequantize_4bit(codes, state)
    assert dequantized.dtype == torch.float32
    x = torch.randn(rows, k, generator=generator).bfloat16()
    absmax = _absmax(state).float()
    got = native.four_bit_matvec(
        x, codes.view(torch.uint8).reshape(-1), absmax, state.code.float(), 640, blocksize, None
    )
    span_largest = x.float().abs().view(rows, -1, 64).amax(-1)
    span_absmax = absmax.view(640, -1).repeat_interleave(blocksize // 64, dim=1)
    fixed_point = 64 * span_largest @ span_absmax.t() / 16383
    _within_bf16_rounding(got, x.float() @ dequantized.t(), fixed_point)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_the_native_norm_and_mlp_product_round_as_torchs_ops(engine, rows: int) -> None:  # type: ignore[no-untyped-def]
    """``layer_math.cpp``'s RMSNorm and silu(gate) * up against the ATen ops they replace in bf16
    (the Python loop's without the extension): the same roundings, the float32 sums in another
    order, so at most one bf16 step apart; the gate and up here are slices of one tensor."""
    import torch.nn.functional as F

    native = engine._decoder.native
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=generator) * 3).bfloat16()
    weight = torch.rand(576, generator=generator).bfloat16()
    expected = weight * F.rms_norm(x.float(), (576,), eps=1e-5).bfloat16()
    _within_bf16_rounding(native.rms_norm(x, weight, 1e-5), expected.float(), 2**-8 * expected.float().abs())
    both = (torch.randn(rows, 2 * 1536, generator=generator) * 4).bfloat16()
    gate, up = both[:, :1536], both[:, 1536:]
    expected = F.silu(gate) * up
    _within_bf16_rounding(native.silu_mul(gate, up), expected.float(), 2**-8 * expected.float().abs())


def _one_bf16_step_at_most(got: torch.Tensor, expected: torch.Tensor) -> int:
    """How many of ``got``'s bf16 values differ from ``expected``'s, each at most one bf16 step
    (adjacent bit patterns of the same sign)."""
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    steps = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1, int(steps.max())
    return int(steps.count_nonzero())


def _llm_int8_module(n: int, k: int, bias: bool, threshold: float, generator: torch.Generator):  # type: ignore[no-untyped-def]
    from tutor.engine import quantize

    master = torch.nn.Linear(k, n, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        master.weight.copy_(torch.randn(n, k, generator=generator) * 0.05)
        if bias:
            master.bias.copy_(torch.randn(n, generator=generator))
    module = quantize.build_all("int8", {"o": master}, int8_threshold=threshold).modules["o"]
    with torch.inference_mode():
        module(torch.zeros(1, k, dtype=torch.bfloat16))  # the codes are made at the first call
    return module


def _with_outliers(rows: int, k: int, outliers: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, k, generator=generator)
    x[:, torch.randperm(k, generator=generator)[:outliers]] *= 12  # past the threshold
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("threshold", [6.0, 0.0], ids=["outliers held back", "no threshold"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_llm_int8_in_cpp_gives_the_modules_own_output(engine, threshold: float, bias: bool) -> None:  # type: ignore[no-untyped-def]
    """LLM.int8's linear in C++ for a decode step's rows (what the decode step calls, up to
    NATIVE_STEP_ROWS_INT8) is bitsandbytes' Linear8bitLt bit for bit, on every CPU, with outlier
    columns in the input and without; float32 rows too (the plain loops, not AVX2's)."""
    from tutor.engine.linears import NATIVE_STEP_ROWS_INT8

    native = engine._decoder.native
    generator = torch.Generator().manual_seed(8)
    module = _llm_int8_module(96, 192, bias, threshold, generator)
    state = module.state
    cases = [(1, 0), (1, 2), (2, 3), (NATIVE_STEP_ROWS_INT8, 5)] + [(1, draw % 4) for draw in range(20)]
    with torch.inference_mode():
        for rows, outliers in cases:
            x = _with_outliers(rows, 192, outliers, generator)
            if rows > 1:  # a row of zeros: absmax 0, its codes 0 * inf
                x[-1] = 0
            for given in (x, x.float()):
                found = native.llm_int8_linear(given, state.CB, state.SCB, module.bias, state.threshold)
                assert torch.equal(found, module(given)), (rows, outliers, given.dtype)


@pytest.mark.parametrize(("n", "k"), [(3072, 576), (576, 1536), (40, 48)])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_llm_int8_over_a_prompts_rows_is_the_modules_output(engine, n: int, k: int, bias: bool) -> None:  # type: ignore[no-untyped-def]
    """A prompt's rows through the integer GEMM (AVX2): bit for bit without outlier columns, and
    with them at most one bf16 step apart on a few outputs (their float32 sums in another
    order than ATen's addmm). Row counts that are not whole tiles of four; n = 40 is not a
    whole block of outputs; a row of zeros and one whose only value is an outlier (absmax 0,
    codes 0 * inf, as ATen makes them)."""
    from tutor.engine.linears import NATIVE_STEP_ROWS_INT8

    native = engine._decoder.native
    if not native.avx2_int8_gemm(k, n):
        pytest.skip("no AVX2 here: a prompt's rows take bitsandbytes' own way")
    generator = torch.Generator().manual_seed(n + k)
    module = _llm_int8_module(n, k, bias, 6.0, generator)
    state = module.state
    differing = 0
    with torch.inference_mode():
        for rows, outliers in (
            (NATIVE_STEP_ROWS_INT8 + 1, 0),
            (37, 0),
            (300, 0),
            (37, 5),
            (301, 12),
            (13, 40),
        ):
            x = _with_outliers(rows, k, outliers, generator)
            x[0] = 0
            if outliers:
                x[1] = torch.where(x[1].abs() >= 6, x[1], 0)
            found = native.llm_int8_linear(x, state.CB, state.SCB, module.bias, state.threshold)
            if outliers == 0:
                assert torch.equal(found, module(x)), (rows, outliers)
            differing += _one_bf16_step_at_most(found, module(x))
    assert differing <= 1e-3 * 301 * n, differing


def test_without_bf16_matmul_decoding_multiplies_natively(engine) -> None:  # type: ignore[no-untyped-def]
    """bf16 layers, the lm_head and nf4 layers run on the native matvec where oneDNN only
    emulates bf16 (an AVX2 CPU), and so do LLM.int8's integer products; elsewhere oneDNN's and
    bitsandbytes' kernels do."""
    from tutor.engine import native_step
    from tutor.engine.linears import RowsLinear, bf16_matmul_is_emulated

    if not bf16_matmul_is_emulated():
        pytest.skip("this CPU multiplies bf16 natively: oneDNN's and bitsandbytes' kernels serve")
    for precision in ("bf16", "nf4"):
        engine.switch(precision, wait=True)
        weights = engine._current_weights()
        layer = weights.layers[0]
        assert type(weights.head) is RowsLinear
        for slot in (layer.qkv or layer.q, layer.down):
            assert type(slot) is RowsLinear, (precision, type(slot))
    engine.switch("int8", wait=True)
    down = engine._current_weights().layers[0].down
    assert down.native is not None, "LLM.int8's codes multiplied natively"
    assert native_step._spec(down)[0] == native_step.LLM_INT8, "and the decode step calls it natively"


def test_a_prompt_reads_natively_up_to_its_mark_then_by_gemm(engine) -> None:  # type: ignore[no-untyped-def]
    """Where the CPU only emulates bf16 matmul, a prompt of up to ``NATIVE_ROWS_4BIT`` tokens
    multiplies a 4-bit weight on the native matvec (faster than dequantizing it for an fp32
    GEMM at every call: linears.py), and one token more takes the GEMM; bf16 weights likewise
    up to ``NATIVE_ROWS_BF16``. The two ways differ (the 4-bit weight's float32 against its bf16
    dequantization, the sums' order), so each output says which way it went."""
    from tutor.engine import linears, quantize

    if not linears.bf16_matmul_is_emulated():
        pytest.skip("this CPU multiplies bf16 natively: oneDNN's and bitsandbytes' kernels serve")
    native = engine._decoder.native
    generator = torch.Generator().manual_seed(11)
    master = torch.nn.Linear(576, 192, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        master.weight.copy_(torch.randn(192, 576, generator=generator) * 0.05)
    nf4 = quantize.build_all("nf4", {"o": master}).modules["o"]
    slots = {
        "nf4": (
            linears.RowsLinear(nf4),
            linears.NATIVE_ROWS_4BIT,
            lambda slot, x: native.four_bit_matvec(
                x, slot.weight, slot.absmax, slot.table, 192, slot.blocksize, None
            ),
            linears.ModuleLinear(nf4),
        ),
        "bf16": (
            linears.RowsLinear(master),
            linears.NATIVE_ROWS_BF16,
            lambda slot, x: native.bf16_matvec(x, slot.weight, None),
            linears.ModuleLinear(master),
        ),
    }
    with torch.inference_mode():
        for name, (slot, mark, natively, by_gemm) in slots.items():
            for rows in (mark, mark + 1):
                x = torch.randn(rows, 576, generator=generator).bfloat16()
                ours, theirs = natively(slot, x), by_gemm(x)
                assert not torch.equal(ours, theirs), name
                assert torch.equal(slot(x), ours if rows <= mark else theirs), (name, rows)


def test_a_failed_build_names_the_compilers_error() -> None:
    from tutor.engine.native_step import _first_error

    output = (
        "Error building extension 'x': [1/2] c++ -MMD -c decode_step.cpp -o decode_step.o\n"
        "decode_step.cpp:216:7: error: 'parallel_for' is not a member of 'at'\n"
        "ninja: build stopped: subcommand failed."
    )
    assert _first_error(output) == "decode_step.cpp:216:7: error: 'parallel_for' is not a member of 'at'"
    assert (
        _first_error("Ninja is required to load C++ extensions") == "Ninja is required to load C++ extensions"
    )


def _built_copy(model_cache, tmp_path):  # type: ignore[no-untyped-def]
    """A copy of the session's build of the extension, and a function that loads it in a process
    of its own, as the app's engine processes do (``_build``'s outcome, or its error). In this
    process the extension is loaded already under the same name, from another folder, and
    torch's builder would build it again under a new name (90 s on a 2-core AVX2 EPYC)."""
    import shutil
    import subprocess
    import sys

    from tutor.engine import native_step

    key = native_step.build_key()
    folder = tmp_path / "native"
    shutil.copytree(model_cache / "native" / f"decode_step-{key}", folder)
    script = (
        "import sys; from pathlib import Path; from tutor.engine import native_step\n"
        "try: print(hasattr(native_step._build(Path(sys.argv[1]), sys.argv[2]), 'step'))\n"
        "except ImportError: print('not loaded')"
    )

    def load(timeout: float | None = None) -> str:
        name = f"quant_tutor_decode_step_{key}"
        ran = subprocess.run(
            [sys.executable, "-c", script, str(folder), name], capture_output=True, text=True, timeout=timeout
        )
        return ran.stdout.strip() or ran.stderr[-2000:]

    return folder, load


def test_a_build_killed_midway_does_not_stall_the_next_load(engine, model_cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """torch's builder waits for ever on the lock file of a build whose process died; the
    next load must go on (here: a finished build with such a file left in it)."""
    folder, load = _built_copy(model_cache, tmp_path)
    (folder / "lock").write_text("")
    # A wait on the lock runs into the timeout (the load itself takes a few seconds).
    assert load(timeout=120) == "True", "the load waited on a dead build's lock file"


def test_a_library_left_broken_is_removed_for_the_next_load(engine, model_cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder, load = _built_copy(model_cache, tmp_path)
    [library] = folder.glob("*.so")
    library.write_bytes(library.read_bytes()[:100])  # as a link killed halfway leaves it
    # This process runs the Python loop, and the folder is gone: the next load builds from
    # nothing, as the session's own first build did (building it again here took 104 s on a
    # 2-core AVX2 EPYC and would test that build once more).
    assert load() == "not loaded" and not folder.exists()
