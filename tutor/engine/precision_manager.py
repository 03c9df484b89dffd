"""In-place precision switching: bf16 masters kept once, prepared precisions cached under a bound.

The decoder's Linear layers as loaded (bf16) are the *masters*: kept once, never modified. A
switch to int8 / nf4 / fp4 builds bitsandbytes modules from them (see ``quantize``) and puts
those in the model in place of the Linear layers; a switch back puts the very same master
modules back, so bf16 after any round trip is the original bit for bit. fp32 is the masters
upcast. Nothing is re-read from disk.

A *prepared* precision keeps what it built (bitsandbytes modules, the fast decoder's packed
copies), so switching back to it later only swaps references (milliseconds). Prepared forms
are kept least-recently-used first under ``limit_bytes``; the active precision is never
dropped. Building happens off to the side and only a finished build is installed, so a failed
build (out of memory, a bitsandbytes error) leaves the model as it was.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tutor.engine.errors import SwitchError, reason
from tutor.engine.precisions import PRECISIONS, TORCH_CPU_KERNELS, check_precision
from tutor.engine.reports import WeightsReport

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tutor.engine.decoder import FastDecoder
    from tutor.engine.decoder_weights import DecoderWeights
    from tutor.engine.int4 import Codes


@dataclass
class PreparedPrecision:
    """What one precision needs beyond the masters."""

    precision: str
    modules: dict[str, nn.Module] | None  # bitsandbytes modules to put in the model (quantized only)
    param_data: dict[str, torch.Tensor] | None  # fp32 on the generic path: replacement parameter data
    weights: DecoderWeights | None  # the fast decoder's view (None on the generic path)
    bytes: int  # memory held beyond the masters
    seconds: float  # time it took to build
    report: WeightsReport


def _parent_and_child(model: Any, name: str) -> tuple[Any, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class PrecisionManager:
    """Owns which precision the model runs at and the prepared forms of the others."""

    def __init__(
        self,
        model: Any,
        *,
        decoder: FastDecoder | None,
        device: torch.device,
        limit_bytes: int,
        int8_threshold: float = 6.0,
        double_quant: bool = False,
        workers: int = 1,
    ) -> None:
        import torch
        from torch import nn

        self.model = model
        self.decoder = decoder
        self.device = device
        self.limit_bytes = int(limit_bytes)
        self.int8_threshold = float(int8_threshold)
        self.double_quant = bool(double_quant)
        self.workers = max(1, int(workers))
        head = model.get_output_embeddings()
        self.masters: dict[str, nn.Linear] = {
            name: module
            for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not head
        }
        if not self.masters:
            raise SwitchError("This model has no Linear layers to quantize.", precision="bf16", kept="bf16")
        self.master_dtype = next(iter(self.masters.values())).weight.dtype
        if self.master_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise SwitchError(f"Unexpected weight dtype {self.master_dtype}.", precision="bf16", kept="bf16")
        self._params = [(name, p, p.data) for name, p in model.named_parameters()]
        self.master_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self.masters.values())
        self._kept_names, self._kept_bytes = self._describe_kept()
        self.active = "bf16"
        self._prepared: OrderedDict[str, PreparedPrecision] = OrderedDict()
        self._lock = threading.RLock()  # guards _prepared and installs
        self._build_lock = threading.Lock()  # one build at a time
        self.last_evicted: list[str] = []
        self.pinned: frozenset[str] = frozenset()  # never evicted (Engine.pinned)
        self.build_hook: Callable[[str], None] | None = None  # tests use it to inject failures
        # gptq4's codes, by the group of masters each covers (the Engine calibrates, or reads its cache)
        self.calibrated: Callable[[], Mapping[tuple[str, ...], Codes]] | None = None
        self._prepared["bf16"] = self._build("bf16")

    # ------------------------------------------------------------------ queries

    def act_dtype(self, precision: str) -> torch.dtype:
        import torch

        if precision == "fp32":
            return torch.float32
        if PRECISIONS[precision].quantized:
            return torch.bfloat16 if self.master_dtype == torch.float32 else self.master_dtype
        return self.master_dtype

    def is_prepared(self, precision: str) -> bool:
        with self._lock:
            return check_precision(precision) in self._prepared

    def prepared(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._prepared)

    def prepared_bytes(self) -> int:
        with self._lock:
            total = sum(p.bytes for p in self._prepared.values())
        if self.decoder is not None:
            total += self.decoder.head_bytes()
        return total

    def current(self) -> PreparedPrecision:
        with self._lock:
            return self._prepared[self.active]

    def reference_weights(self) -> DecoderWeights:
        """The fast decoder's bf16 weights: those held, or (evicted) built for the caller alone,
        without the build lock, so a build may read through them."""
        with self._lock:
            held = self._prepared.get("bf16")
        if held is not None and held.weights is not None:
            return held.weights
        if self.decoder is None:
            raise RuntimeError("no fast decoder")
        return self.decoder.build_weights("bf16", dict(self.masters), self.act_dtype("bf16"))

    def weights_report(self, precision: str | None = None) -> WeightsReport:
        with self._lock:
            prepared = self._prepared.get(precision or self.active)
        if prepared is None:
            raise KeyError(precision)
        return prepared.report

    # ------------------------------------------------------------------ building

    def _measure(self, precision: str, modules: dict[str, nn.Module] | None) -> WeightsReport:
        """Bytes of the model's parameters and quantization state at ``precision``."""
        from tutor.engine.memory import module_bytes

        scale = 4 // self.master_dtype.itemsize if precision == "fp32" else 1
        kept_bytes = self._kept_bytes * scale
        seen: set[int] = set()
        if modules is None or not PRECISIONS[precision].quantized:
            dense = (
                self.master_bytes * scale
                if modules is None
                else sum(module_bytes(m, seen) for m in modules.values())
            )
            return WeightsReport(
                precision=precision,
                weights_bytes=kept_bytes + dense,
                quantized_modules=0,
                quantized_bytes=0,
                linear_modules=len(self.masters),
                kept_modules=(),
                kept_bytes=kept_bytes,
            )
        quantized_bytes = sum(module_bytes(m, seen) for m in modules.values())
        return WeightsReport(
            precision=precision,
            weights_bytes=kept_bytes + quantized_bytes,
            quantized_modules=len(modules),
            quantized_bytes=quantized_bytes,
            linear_modules=len(self.masters),
            kept_modules=self._kept_names,
            kept_bytes=kept_bytes,
        )

    def _describe_kept(self) -> tuple[tuple[str, ...], int]:
        """Names and bytes of the parameters outside the decoder Linear layers (never quantized)."""
        from tutor.engine.memory import tensor_bytes

        master_params = {id(p) for m in self.masters.values() for p in m.parameters()}
        kept = [(name, param) for name, param, _data in self._params if id(param) not in master_params]
        names: list[str] = []
        embed = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        if embed is not None:
            rows, cols = embed.weight.shape
            tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
            names.append(f"embedding/lm_head (tied, {rows}x{cols})" if tied else f"embedding ({rows}x{cols})")
            if head is not None and not tied:
                names.append("lm_head")
        if any("norm" in name for name, _ in kept):
            names.append("norms")
        return tuple(names), tensor_bytes(param.data for _name, param in kept)

    def _build(self, precision: str) -> PreparedPrecision:
        import torch

        from tutor.engine import quantize
        from tutor.engine.bnb_modules import restored

        start = time.perf_counter()
        if self.build_hook is not None:
            self.build_hook(precision)
        modules: dict[str, nn.Module] | None = None
        fused: dict[tuple[str, ...], nn.Module] = {}
        param_data: dict[str, torch.Tensor] | None = None
        weights = None
        extra = 0
        act = self.act_dtype(precision)
        info = PRECISIONS[precision]
        groups = self.decoder.fusion_groups() if self.decoder is not None else []
        if precision in TORCH_CPU_KERNELS:
            modules, fused = self._build_on_torch_kernel(precision, groups)
        elif info.quantized or info.restored_from is not None:
            via = info.restored_from or precision
            built = quantize.build_all(
                via,
                self.masters,
                # restored layers are plain Linear again: the decoder fuses those itself
                groups=groups if info.quantized else (),
                workers=self.workers if self.device.type == "cpu" else 1,
                int8_threshold=self.int8_threshold,
                double_quant=self.double_quant,
                compute_dtype=self.act_dtype(via),
            )
            modules, fused = built.modules, built.fused
            if info.restored_from is not None:
                from tutor.engine.memory import blocks_mapped

                with blocks_mapped():  # no float32 scratch left in the heap around them
                    modules = {name: restored(m, act) for name, m in modules.items()}
        if modules is not None:
            from tutor.engine.memory import module_bytes

            seen: set[int] = set()
            extra += sum(module_bytes(m, seen) for m in (*modules.values(), *fused.values()))
        if self.decoder is not None:
            source: dict[str, nn.Module] = dict(modules) if modules is not None else dict(self.masters)
            # A restored precision held with nothing else to spare (a lean engine: the Lab reads
            # its windows) computes on the restored weights themselves, not on packed copies: its
            # build peaked 150-240 MB lower, its windows read 5-10 % slower.
            lean_restore = info.restored_from is not None and self.limit_bytes == 0
            weights = self.decoder.build_weights(
                precision, source, act, fused=fused, copies_allowed=not lean_restore
            )
            extra += weights.copy_bytes
        elif precision == "fp32" and self.master_dtype != torch.float32:
            with torch.no_grad():
                param_data = {name: data.to(torch.float32) for name, _param, data in self._params}
            from tutor.engine.memory import tensor_bytes

            extra += tensor_bytes(param_data.values())
        report = self._measure(precision, modules)
        return PreparedPrecision(
            precision, modules, param_data, weights, extra, time.perf_counter() - start, report
        )

    def _build_on_torch_kernel(
        self, precision: str, groups: list[tuple[str, ...]]
    ) -> tuple[dict[str, nn.Module], dict[tuple[str, ...], nn.Module]]:
        from tutor.engine import int4, int8wo

        if self.device.type != "cpu":
            raise RuntimeError(
                f"{precision} runs on a torch kernel for CPUs; on {self.device.type} use "
                f"{PRECISIONS[precision].off_cpu}"
            )
        if precision == "int8-wo":
            return int8wo.build_int8wo(self.masters, groups)
        if precision == "gptq4":
            if self.calibrated is None:
                raise RuntimeError("gptq4 calibrates on the fast decoder, which this model does not run on")
            codes = self.calibrated()
        else:
            codes = int4.rounded_to_nearest(self.masters, groups)
        return int4.build_int4(self.masters, codes)

    def prepare(self, precision: str) -> tuple[PreparedPrecision, bool]:
        """Build ``precision`` if it is not held yet; returns (prepared, was_already_held)."""
        precision = check_precision(precision)
        with self._lock:
            held = self._prepared.get(precision)
            if held is not None:
                self._prepared.move_to_end(precision)
                return held, True
        with self._build_lock:
            with self._lock:
                held = self._prepared.get(precision)
                if held is not None:
                    return held, True
            try:
                built = self._build(precision)
            except Exception as exc:
                raise SwitchError(
                    self._explain(precision, exc), precision=precision, kept=self.active
                ) from exc
            with self._lock:
                self._prepared[precision] = built
                self._enforce_limit(keep={precision, self.active})
            return built, False

    def _explain(self, precision: str, exc: BaseException) -> str:
        why = reason(exc)
        if isinstance(exc, MemoryError) or "out of memory" in why.lower():
            why = f"not enough memory: {why}"
        return f"Could not switch to {precision} ({why}); still running at {self.active}."

    def _enforce_limit(self, keep: set[str]) -> None:
        """Drop least-recently-used prepared precisions (never those in ``keep`` or pinned) over the limit."""
        self.last_evicted = []
        for name in list(self._prepared):
            if self.prepared_bytes() <= self.limit_bytes:
                break
            if name in keep or name in self.pinned:
                continue
            del self._prepared[name]
            self.last_evicted.append(name)

    def drop(self, precision: str) -> bool:
        """Forget a prepared precision (not the active one); True if something was dropped."""
        precision = check_precision(precision)
        with self._lock:
            if precision == self.active or precision not in self._prepared:
                return False
            del self._prepared[precision]
            return True

    # ------------------------------------------------------------------ installing

    def install(self, prepared: PreparedPrecision) -> None:
        """Make ``prepared`` the model's precision (reference swaps only; cannot half-fail)."""
        with self._lock:
            previous = self._prepared.get(self.active)
            try:
                self._swap_in(prepared)
            except Exception:
                if previous is not None:
                    self._swap_in(previous)
                raise
            self.active = prepared.precision
            self._prepared[prepared.precision] = prepared
            self._prepared.move_to_end(prepared.precision)
            self._enforce_limit(keep={prepared.precision})

    def _swap_in(self, prepared: PreparedPrecision) -> None:
        targets = prepared.modules or {}
        for name, master in self.masters.items():
            parent, child = _parent_and_child(self.model, name)
            setattr(parent, child, targets.get(name, master))
        replacement = prepared.param_data or {}
        for name, param, data in self._params:
            param.data = replacement.get(name, data)
