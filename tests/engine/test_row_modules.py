"""What both of torch's weight-only CPU kernels promise the engine (int4 / gptq4 and int8-wo)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tutor.engine.int4 import GROUP, Int4Linear, packed_row_block, round_to_nearest
from tutor.engine.int8wo import Int8WoLinear


def _int4(weight: torch.Tensor) -> tuple[Int4Linear, torch.Tensor, str]:
    codes = round_to_nearest(weight)
    return Int4Linear.from_codes(codes), codes.dequantized(), "packed"


def _int8wo(weight: torch.Tensor) -> tuple[Int8WoLinear, torch.Tensor, str]:
    module = Int8WoLinear.of(weight)
    return module, module.dequantized(), "codes"


@pytest.mark.parametrize("build", [_int4, _int8wo], ids=["int4", "int8-wo"])
def test_the_kernel_multiplies_by_the_dequantized_codes_and_rows_share_them(
    build: Callable[[torch.Tensor], tuple[torch.nn.Module, torch.Tensor, str]],
) -> None:
    torch.manual_seed(0)
    module, dequantized, storage = build(torch.randn(256, 2 * GROUP) * 0.05)
    x = torch.randn(3, 5, 2 * GROUP).bfloat16()
    expected = x.float() @ dequantized.T
    out = module(x)
    assert out.shape == (3, 5, 256) and out.dtype == torch.bfloat16
    # bf16 output: a relative rounding of 2^-8 on each sum, nothing more
    assert torch.allclose(out.float(), expected, rtol=2**-7, atol=1e-3)
    # Rows on the int4 packing's block edges (which depend on the CPU) share its storage; any
    # other slice still gives its rows' outputs.
    block = packed_row_block()
    for start, stop in ((block, 2 * block), (16, 48), (240, 256)):
        part = module.rows(start, stop)  # type: ignore[operator]
        if (start, stop) == (block, 2 * block):
            assert (
                getattr(part, storage).untyped_storage().data_ptr()
                == getattr(module, storage).untyped_storage().data_ptr()
            )
        assert part(x).shape == (3, 5, stop - start)
        assert torch.allclose(part(x).float(), out[..., start:stop].float(), rtol=2**-7, atol=1e-3)
