"""The int4 kernel's grid, GPTQ's step and the module the int4 / gptq4 precisions run (no model)."""

from __future__ import annotations

import pytest
import torch

from tutor.engine.calibration import batch_of
from tutor.engine.int4 import GROUP, build_int4, gptq, gptq_batch, round_to_nearest, spread_error


def test_a_gptq_step_is_the_least_squares_solve() -> None:
    """After one column is rounded, GPTQ moves the later columns exactly where a direct
    least-squares solve puts them: the output on the calibration inputs changes least."""
    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)  # correlated
    w = torch.randn(3, 6, dtype=torch.float64)
    rounded = w[:, 0] + torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    inverse = torch.linalg.cholesky(torch.linalg.inv(x.T @ x), upper=True)
    moved = w.clone()
    spread_error(moved, inverse, 0, rounded)
    target = x @ w.T - x[:, :1] @ rounded[None, :]  # what the later columns must still produce
    solved = torch.linalg.lstsq(x[:, 1:], target).solution.T
    assert torch.allclose(moved[:, 0], rounded, atol=1e-12)
    assert torch.allclose(moved[:, 1:], solved, atol=1e-9)


def test_round_to_nearest_lands_on_the_grid_within_half_a_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 4 * GROUP) * 0.02
    codes = round_to_nearest(weight)
    assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) <= 15
    assert torch.equal(codes.scale, codes.scale.bfloat16().float()), "scales are bf16 values"
    step = codes.scale.repeat_interleave(GROUP, 1)
    assert bool(((codes.dequantized() - weight).abs() <= 0.5 * step + 1e-3 * step.max()).all())


def test_gptq_beats_rounding_on_the_layer_output_not_on_the_weights() -> None:
    """On correlated inputs GPTQ's output error is well below round-to-nearest's on the same grid,
    on inputs it was not calibrated on."""
    torch.manual_seed(0)
    mixing = torch.eye(128) + 0.3 * torch.randn(128, 128)
    calibration, held_out = torch.randn(2048, 128) @ mixing, torch.randn(256, 128) @ mixing
    weight = torch.randn(48, 128) * 0.02
    rtn, calibrated = round_to_nearest(weight), gptq(weight, calibration.T @ calibration, damp=0.03)

    def output_error(w: torch.Tensor) -> float:
        return float((held_out @ w.T - held_out @ weight.T).norm() / (held_out @ weight.T).norm())

    assert output_error(calibrated.dequantized()) < 0.8 * output_error(rtn.dequantized())
    assert float((calibrated.dequantized() - weight).norm()) > float((rtn.dequantized() - weight).norm())


def test_a_weights_codes_do_not_depend_on_its_batch() -> None:
    """Calibration batches same-shaped weights by memory (three down_proj, more of the smaller
    ones): each weight gets the codes it gets alone (bit for bit here; a batched matmul may take
    another kernel on another CPU, so a rare rounding tie may fall the other way)."""
    torch.manual_seed(0)
    inputs = [torch.randn(512, 2 * GROUP) for _ in range(3)]
    weights = torch.randn(3, 40, 2 * GROUP) * 0.02
    together = gptq_batch(weights, torch.stack([x.T @ x for x in inputs]), damp=0.03)
    for weight, x, batched in zip(weights, inputs, together, strict=True):
        alone = gptq(weight, x.T @ x, damp=0.03)
        assert float((alone.codes == batched.codes).float().mean()) > 0.999
        assert torch.allclose(alone.scale, batched.scale, rtol=1e-2)
    assert (batch_of((576, 1536)), batch_of((3072, 576))) == (3, 7)


def test_build_int4_fuses_groups_and_names_what_is_missing() -> None:
    torch.manual_seed(0)
    masters = {n: torch.nn.Linear(GROUP, rows, bias=False) for n, rows in (("q", 32), ("k", 16), ("o", 64))}
    codes = {("q", "k"): round_to_nearest(torch.cat([masters["q"].weight, masters["k"].weight]).detach())}
    with pytest.raises(ValueError, match="no int4 weights for o"):
        build_int4(masters, codes)
    codes[("o",)] = round_to_nearest(masters["o"].weight.detach())
    modules, fused = build_int4(masters, codes)
    assert list(modules) == ["q", "k", "o"] and list(fused) == [("q", "k")]
    x = torch.randn(2, GROUP).bfloat16()
    whole = fused["q", "k"](x).float()
    parts = torch.cat([modules["q"](x), modules["k"](x)], -1).float()
    assert torch.allclose(parts, whole, rtol=2**-7, atol=1e-3)


def test_a_prompts_many_rows_take_a_dense_matmul_on_the_unpacked_codes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tutor.engine.int4 import Int4Linear, dense_rows, unpacks

    if not unpacks(128):
        pytest.skip("this CPU packs int4 codes in a layout the prompt path does not read: the kernel serves")
    torch.manual_seed(0)
    codes = round_to_nearest(torch.randn(128, 256) * 0.05)
    module = Int4Linear.from_codes(codes)
    assert torch.equal(module.dequantized(), codes.dequantized()), "read back from the kernel's packing"
    prompt = torch.randn(dense_rows() + 24, 256).bfloat16()
    exact = prompt.double() @ codes.dequantized().double().T
    linear, called = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: called.append(1) or linear(*a))
    dense = module(prompt).double()
    assert called, "a prompt's rows: one dense matmul"
    kernel = torch.cat([module(rows) for rows in prompt.split(dense_rows())]).double()  # few rows each

    def rms(t: torch.Tensor) -> float:
        return float(t.pow(2).mean().sqrt())

    rounding = rms(exact.bfloat16().double() - exact)
    assert rms(dense - exact) <= 1.6 * rounding
    assert rms(dense - kernel) <= 2 * rounding
