"""int8-wo: int8 weight codes with a bf16 scale per row on torch's weight-only int8 kernel (no model)."""

from __future__ import annotations

import pytest
import torch

from tutor.engine.int8wo import LEVELS, Int8WoLinear, build_int8wo
from tutor.engine.linears import PREFILL_ROWS


def test_codes_are_within_half_a_step_and_the_absmax_lands_on_a_code() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 160) * 0.02
    module = Int8WoLinear.of(weight)
    assert module.codes.dtype == torch.int8 and module.scales.dtype == torch.bfloat16
    step = module.scales.float()[:, None]
    assert bool(((module.dequantized() - weight).abs() <= step / 2 + 1e-7).all())
    assert bool((module.codes.abs().amax(1) >= LEVELS - 1).all()), "each row's largest weight near ±127"
    # A prompt's dense matmul takes the weight straight in bf16: the float32 one rounded once.
    assert torch.equal(module.dequantized(torch.bfloat16), module.dequantized().to(torch.bfloat16))


@pytest.mark.parametrize("emulated", [True, False], ids=["fp32 dense (AVX2)", "bf16 dense (native bf16)"])
def test_a_prompts_many_rows_take_the_dense_path(emulated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same product, to bf16's rounding, on either dense path (each CPU takes one; the
    kernel's own path: tests/engine/test_row_modules.py)."""
    from tutor.engine import linears

    monkeypatch.setattr(linears, "bf16_matmul_is_emulated", lambda: emulated)
    linear, called = torch.nn.functional.linear, []

    def spy(x: torch.Tensor, weight: torch.Tensor, *rest: object) -> torch.Tensor:
        called.append(weight.dtype)
        return linear(x, weight, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    torch.manual_seed(0)
    module = Int8WoLinear.of(torch.randn(96, 128) * 0.05)
    prompt = torch.randn(1, PREFILL_ROWS + 24, 128).bfloat16()
    dense = module(prompt).double()
    exact = prompt.double() @ module.dequantized().double().T

    def rms(t: torch.Tensor) -> float:
        return float(t.pow(2).mean().sqrt())

    # fp32: only the output's rounding to bf16; bf16: the weight's rounding to bf16 as well.
    rounding = rms(exact.bfloat16().double() - exact)
    assert rms(dense - exact) <= (1.0 if emulated else 1.6) * rounding + 1e-9
    kernel = module(prompt[:, :PREFILL_ROWS]).double()  # few rows: the int8 kernel
    assert rms(kernel - exact[:, :PREFILL_ROWS]) <= 1.05 * rms(
        exact[:, :PREFILL_ROWS].bfloat16().double() - exact[:, :PREFILL_ROWS]
    )
    assert rms(dense[:, :PREFILL_ROWS] - kernel) <= 2 * rounding
    assert called == [torch.float32 if emulated else torch.bfloat16], "one dense matmul, then the kernel"


def test_build_fuses_groups_as_row_views_of_one_weight() -> None:
    torch.manual_seed(0)
    masters = {n: torch.nn.Linear(64, rows, bias=False) for n, rows in (("q", 32), ("k", 16), ("o", 64))}
    modules, fused = build_int8wo(masters, [("q", "k")])
    assert list(modules) == ["q", "k", "o"] and list(fused) == [("q", "k")]
    x = torch.randn(2, 64).bfloat16()
    assert torch.equal(torch.cat([modules["q"](x), modules["k"](x)], -1), fused["q", "k"](x))
    assert isinstance(modules["o"], Int8WoLinear) and modules["o"].codes.shape == (64, 64)
    # One scale per row, so a row keeps its scale whether it is quantized stacked or alone.
    assert torch.equal(modules["q"].codes, Int8WoLinear.of(masters["q"].weight.detach()).codes)


def test_a_master_with_no_weights_is_named() -> None:
    from tutor.engine.row_modules import assemble

    masters = {n: torch.nn.Linear(64, 8, bias=False) for n in ("q", "o")}
    with pytest.raises(ValueError, match="no int8-wo weights for o"):
        assemble(masters, {("q",): Int8WoLinear.of(masters["q"].weight.detach())}, "int8-wo")
