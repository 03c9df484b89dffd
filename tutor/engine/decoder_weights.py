"""What the fast decoder computes with at one precision: per layer, its Linear slots and norms.

``FastDecoder.build_weights`` (:mod:`tutor.engine.decoder`) makes a ``DecoderWeights`` per
precision; ``tapped`` gives a copy whose slots show their inputs (calibration, the lab's probes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

# Imported only once a model is being loaded (as the decoder is), so torch at the top is fine here.
import torch

from tutor.engine.linears import See, Slot, Tap

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LayerWeights:
    q: Slot | None
    k: Slot | None
    v: Slot | None
    qkv: Slot | None  # fused q|k|v when available
    o: Slot
    gate: Slot | None
    up: Slot | None
    gate_up: Slot | None  # fused gate|up when available
    down: Slot
    ln1: torch.Tensor
    ln2: torch.Tensor


@dataclass
class DecoderWeights:
    """Everything the fast decoder computes with at one precision."""

    precision: str
    act_dtype: torch.dtype
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: Slot
    copies: list[torch.Tensor] = field(default_factory=list)  # tensors held only for this precision
    # Its decode steps recorded as CUDA graphs, by row count and cache size
    # (``tutor.engine.graphs``), or why they cannot be.
    steps: dict[tuple[int, int], Any] = field(default_factory=dict)
    graph_problem: str | None = None
    # The native decode step's view of these weights (``tutor.engine.native_step``), made at its
    # first step; not carried into a copy (``replace``), whose slots may differ (taps).
    native: Any = field(default=None, init=False, repr=False)

    @property
    def copy_bytes(self) -> int:
        from tutor.engine.memory import tensor_bytes

        return tensor_bytes(self.copies)


def linear_names(layer: int) -> dict[str, str]:
    """``q_proj`` -> ``model.layers.{layer}.self_attn.q_proj`` and so on, for each Linear."""
    return {
        n: f"model.layers.{layer}.{'self_attn' if n in LINEAR_NAMES[:4] else 'mlp'}.{n}" for n in LINEAR_NAMES
    }


# The decoder Linear slots and the modules each computes (a fused slot computes several).
_SLOT_MODULES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate": ("gate_proj",),
    "up": ("up_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def slots(weights: DecoderWeights) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(layer, slot attribute, the full names of the modules it computes) for every Linear slot
    ``weights`` has, in the order a forward pass reads them."""
    for i, lw in enumerate(weights.layers):
        full = linear_names(i)
        for attr, names in _SLOT_MODULES.items():
            if getattr(lw, attr) is not None:
                yield i, attr, tuple(full[n] for n in names)


def tapped(weights: DecoderWeights, see: See) -> DecoderWeights:
    """``weights`` with each decoder Linear slot showing its input to ``see`` (a fused slot
    once, with the names of all the modules it computes)."""
    taps: list[dict[str, Any]] = [{} for _ in weights.layers]
    for i, attr, names in slots(weights):
        taps[i][attr] = Tap(getattr(weights.layers[i], attr), names, see)
    layers = [replace(lw, **layer_taps) for lw, layer_taps in zip(weights.layers, taps, strict=True)]
    return replace(weights, layers=layers, copies=[], steps={})
