"""Looking inside one forward pass for the lab: each decoder Linear's input (what GPTQ and the
activation lessons read) and the memory a prompt's prefill takes.

These run under the engine's lock, which ``Engine`` takes around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity, profile

from tutor.engine.decoder_weights import tapped
from tutor.engine.errors import EngineError
from tutor.engine.precisions import DEFAULT_PRECISION

if TYPE_CHECKING:
    from tutor.engine.decoder import FastDecoder
    from tutor.engine.decoder_weights import DecoderWeights
    from tutor.engine.linears import See
    from tutor.engine.precision_manager import PrecisionManager


def show_linear_inputs(
    model: Any, decoder: FastDecoder | None, manager: PrecisionManager, ids: torch.Tensor, see: See
) -> None:
    """Read ``ids`` at the reference precision, showing each decoder Linear's input to ``see``
    (see ``Engine.linear_inputs``): through the fast decoder's tapped weights when there is one,
    else through hooks on the model's own Linears, which must hold the reference precision."""
    with torch.inference_mode():
        if decoder is not None:
            decoder.forward(tapped(manager.reference_weights(), see), ids, None)
            return
        if manager.active != DEFAULT_PRECISION:
            raise EngineError(f"Switch to {DEFAULT_PRECISION} first: the model holds {manager.active}.")
        hooks = [
            module.register_forward_pre_hook(
                lambda m, inputs, name=name: see((name,), inputs[0].reshape(-1, m.in_features))
            )
            for name, module in manager.masters.items()
        ]
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()


def prefill_footprint(decoder: FastDecoder, weights: DecoderWeights, ids: Sequence[int]) -> tuple[int, int]:
    """(the KV buffer's bytes, the peak of torch's allocations above those before) for reading
    ``ids`` into a fresh buffer (see ``Engine.prefill_footprint``)."""
    device = decoder.device
    with torch.inference_mode():
        cache = decoder.new_cache(len(ids), weights.act_dtype)
        tensor = torch.tensor([list(ids)], dtype=torch.long, device=device)
        if device.type == "cuda":  # the caching allocator keeps its own peak
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            decoder.forward(weights, tensor, cache)
            return cache.data.nbytes, torch.cuda.max_memory_allocated(device) - before
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            decoder.forward(weights, tensor, cache)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return cache.data.nbytes, peak
