"""Loading a model into an Engine: the device checked, the transformers model and tokenizer
read (a damaged converted cache rebuilt once), the fast decoder and the precision manager set up
over it with the memory the prepared precisions may hold, and bitsandbytes imported ahead."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.engine.checkpoint import Checkpoint, discard, resolve_checkpoint
from tutor.engine.errors import DeviceError, EngineError, ModelLoadError, SwitchError, reason
from tutor.engine.precisions import DEFAULT_PRECISION, check_precision
from tutor.engine.reports import LoadProgress, ProgressCallback

if TYPE_CHECKING:
    import torch

    from tutor.engine.decoder import FastDecoder
    from tutor.engine.engine import Engine
    from tutor.engine.precision_manager import PrecisionManager


def check_device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"Unknown device {name!r}; use cpu or cuda.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was asked for but no CUDA GPU is available to PyTorch here; use --device cpu."
        )
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"Device {name!r} is not supported; use cpu or cuda.")
    return device


def default_limit_bytes(master_bytes: int, device: torch.device) -> int:
    """How much the prepared precisions may hold (beyond the masters), by default.

    2.5x the masters but at least 1 GiB (for this model every precision fits, fp32 included),
    capped at a quarter of the memory still free on the device (RAM, or the GPU's), so a large
    model never keeps every precision at once.
    """
    from tutor.engine.memory import available_bytes

    return int(min(max(2.5 * master_bytes, 1024**3), 0.25 * available_bytes(str(device))))


def preload_bitsandbytes() -> None:
    """Import bitsandbytes (1-2 s) once the model is ready, so the learner's first switch only
    pays for quantizing.

    A missing or broken install is not an error here: quantized precisions then fail to switch,
    with the reason, and bf16 / fp32 keep working.
    """
    from tutor.engine.bnb_modules import import_bitsandbytes

    with contextlib.suppress(Exception):
        import_bitsandbytes()


def load_pretrained(
    checkpoint: Checkpoint,
    device: torch.device,
    progress: ProgressCallback | None,
    random_weights: bool = False,
) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    where = checkpoint.path
    if progress is not None:
        progress(LoadProgress("load", 0, 3, "reading the tokenizer"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        if progress is not None:
            progress(LoadProgress("load", 1, 3, "reading the weights"))
        if random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                config = AutoConfig.from_pretrained(str(where))
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.bfloat16)
    except EngineError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"Could not load the model in {where} ({reason(exc)}). If it is a converted cache, delete the "
            "folder and it is rebuilt; otherwise check the files."
        ) from exc
    model.eval()
    model.requires_grad_(False)
    if device.type != "cpu":
        try:
            model.to(device)
        except Exception as exc:
            raise DeviceError(f"Could not move the model to {device} ({reason(exc)}).") from exc
    return model, tokenizer


def load_checkpoint(
    model: str | os.PathLike[str] | None,
    device: torch.device,
    *,
    cache_dir: Path | None,
    progress: ProgressCallback | None,
    random_weights: bool,
) -> tuple[Checkpoint, Any, Any]:
    """``model``'s checkpoint and its transformers model and tokenizer on ``device``."""
    checkpoint = resolve_checkpoint(model, cache_dir=cache_dir, progress=progress)
    try:
        return checkpoint, *load_pretrained(checkpoint, device, progress, random_weights)
    except ModelLoadError:
        if not checkpoint.derived or checkpoint.converted_now:
            raise
    discard(checkpoint)  # a damaged cache: rebuild it once from the GGUF file
    checkpoint = resolve_checkpoint(model, cache_dir=cache_dir, progress=progress)
    return checkpoint, *load_pretrained(checkpoint, device, progress, random_weights)


def precision_parts(
    hf_model: Any,
    device: torch.device,
    *,
    int8_threshold: float,
    double_quant: bool,
    prepared_limit_bytes: int | None,
    fast: bool,
    workers: int | None,
    progress: ProgressCallback | None,
    cache_dir: Path | None = None,
) -> tuple[FastDecoder | None, PrecisionManager]:
    """The fast decoder (``fast`` and a model it runs; on a CPU with the native decode step,
    built into ``cache_dir`` on first use) and the manager of ``hf_model``'s precisions,
    bounded by ``prepared_limit_bytes`` (default: ``default_limit_bytes``)."""
    from tutor.engine.decoder import FastDecoder, fast_path_problem
    from tutor.engine.memory import cpu_count
    from tutor.engine.precision_manager import PrecisionManager

    if progress is not None:
        progress(LoadProgress("load", 2, 3, "preparing the bf16 weights"))
    decoder = FastDecoder(hf_model, device) if fast and fast_path_problem(hf_model) is None else None
    if decoder is not None and device.type == "cpu":
        from tutor.engine import native_step

        def say(text: str) -> None:
            if progress is not None:
                progress(LoadProgress("load", 2, 3, text))

        decoder.native = native_step.load(cache_dir, say)
    master_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for m in hf_model.modules()
        if type(m).__name__ == "Linear" and m is not hf_model.get_output_embeddings()
    )
    limit = (
        prepared_limit_bytes
        if prepared_limit_bytes is not None
        else default_limit_bytes(master_bytes, device)
    )
    try:
        manager = PrecisionManager(
            hf_model,
            decoder=decoder,
            device=device,
            limit_bytes=limit,
            int8_threshold=int8_threshold,
            double_quant=double_quant,
            workers=workers if workers is not None else min(2, cpu_count()),
        )
    except SwitchError as exc:
        raise ModelLoadError(str(exc)) from exc
    if progress is not None:
        progress(LoadProgress("load", 3, 3, "ready"))
    return decoder, manager


def build_engine(
    cls: type[Engine],
    model: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    precision: str = DEFAULT_PRECISION,
    progress: ProgressCallback | None = None,
    cache_dir: Path | None = None,
    int8_threshold: float = 6.0,
    double_quant: bool = False,
    prepared_limit_bytes: int | None = None,
    fast: bool = True,
    workers: int | None = None,
    random_weights: bool = False,
    threads: int | None = None,
) -> Engine:
    """Load ``model`` (None: the embedded SmolLM2-135M-Instruct) on ``device`` at ``precision``.

    Converts the embedded GGUF on first use (``progress`` gets LoadProgress events). Raises
    ModelNotFoundError, ModelLoadError, DeviceError or UnsupportedPrecisionError.
    ``fast=False`` uses the generic transformers decode loop; ``random_weights=True`` builds
    the architecture from the checkpoint's config with random weights (benchmarks only);
    ``workers`` threads build quantized modules (default: up to 2). ``threads`` sets torch's
    intra-op threads for the whole process (default: torch's choice, one per core); on a
    small machine that is also drawing a UI, ``cores - 1`` avoids stalls (see bench notes).
    """
    from tutor.engine.memory import bound_kernel_cache

    bound_kernel_cache()  # before the first matmul
    precision = check_precision(precision)
    torch_device = check_device(device)
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    started = time.perf_counter()
    checkpoint, hf_model, tokenizer = load_checkpoint(
        model, torch_device, cache_dir=cache_dir, progress=progress, random_weights=random_weights
    )
    decoder, manager = precision_parts(
        hf_model,
        torch_device,
        int8_threshold=int8_threshold,
        double_quant=double_quant,
        prepared_limit_bytes=prepared_limit_bytes,
        fast=fast,
        workers=workers,
        progress=progress,
        cache_dir=cache_dir,
    )
    engine = cls(
        model=hf_model,
        tokenizer=tokenizer,
        checkpoint=checkpoint,
        device=torch_device,
        manager=manager,
        decoder=decoder,
        load_seconds=time.perf_counter() - started,
        cache_dir=cache_dir,
    )
    if precision != DEFAULT_PRECISION:
        engine.switch(precision)
    engine.load_seconds = time.perf_counter() - started
    return engine
