"""A decode step in one native call: ``native/decode_step.cpp``, the fast decoder's loop over its
layers for one new position per row, with the same operations in the same order (its output
is the Python loop's bit for bit; tested). Built with it: the attention of a decode step
(``native/decode_attention.cpp``) and bf16's RMSNorm and silu(gate) * up
(``native/layer_math.cpp``), which the Python loop calls too, and in ``native/prefill.cpp``
a prompt's causal attention (``prefill_attention``, in place of SDPA's CPU kernel) and int4's
weight unpacked for a prompt's dense matmul (``int4_weight_t``); few-row products where the CPU
has no bf16 matmul (``native/matvec.cpp``) and LLM.int8's linear where bitsandbytes emulates its
int8 matmul (``native/llm_int8.cpp``).

On a CPU a decode step runs about 30 small operations a layer, and calling each one from Python
cost about as much as the arithmetic: an nf4 step took 6.1 ms in the Python loop and 4.5 ms in
one call (README: "A decode step in one native call"). The extension is built with torch's own
builder once per machine (about 15 s, which ``quant-tutor warm`` pays at ``make install``) into
the cache dir, and loaded from there after that. Where it cannot be built (no C++ compiler) the
Python loop runs and ``problem()`` says why; ``QUANT_TUTOR_NATIVE_STEP=0`` asks for the Python
loop.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Imported only once a model is being loaded, so torch at the top is fine here.
import torch

# The decode step, its attention (``decode_attention``), the kernels that read a prompt
# (``prefill_attention``, ``int4_weight_t``), and the float helpers they share.
FOLDER = Path(__file__).with_name("native")
SOURCES = tuple(
    FOLDER / name
    for name in (
        "decode_step.cpp",
        "decode_attention.cpp",
        "prefill.cpp",
        "matvec.cpp",
        "llm_int8.cpp",
        "layer_math.cpp",
    )
)
HEADERS = tuple(
    FOLDER / name
    for name in ("decode_attention.h", "layer_math.h", "llm_int8.h", "matvec.h", "vector_math.h")
)
ENV = "QUANT_TUTOR_NATIVE_STEP"

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "module" once built, or "problem": why not


def build_key() -> str:
    """Names one build: the sources, torch and Python (a new one of any of them builds again),
    and where the sources and torch's headers lie. The builder's ninja file names them by path,
    so two checkouts sharing one folder rebuilt it in turn, a minute or two at every start."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS)))
    where = f"{FOLDER.resolve()}|{Path(torch.__file__).resolve().parent}"
    digest.update(f"{torch.__version__}|{sys.version}|{platform.machine()}|{where}".encode())
    return digest.hexdigest()[:16]


def load(cache_dir: Path | None = None, say: Callable[[str], None] | None = None) -> Any | None:
    """The extension, built into ``cache_dir``/native on first use (``say`` hears that it is
    being built); None when it cannot be, with :func:`problem` saying why. Once per process."""
    with _lock:
        if "module" in _state or "problem" in _state:
            return _state.get("module")
        if os.environ.get(ENV) == "0":
            _state["problem"] = f"{ENV}=0"
            return None
        if cache_dir is None:
            from tutor.paths import cache_dir as default_cache_dir

            cache_dir = default_cache_dir()
        key = build_key()
        build = Path(cache_dir) / "native" / f"decode_step-{key}"
        if say is not None and not any(build.glob("*.so")):
            say("building the native decode step (once per machine, about 15 s)")
        try:
            _state["module"] = _build(build, f"quant_tutor_decode_step_{key}")
        # Any failure to build (no compiler, no ninja, a header missing) leaves the Python loop,
        # which computes the same: the tutor must not stop for want of a speed-up.
        except Exception as exc:
            _state["problem"] = f"not built: {_first_error(str(exc)) or type(exc).__name__}"
            return None
        return _state["module"]


def _first_error(output: str) -> str:
    """The compiler's first error line in a failed build's output, else its first line (the
    builder's own message begins with the whole compile command)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[0] if lines else "")


def loaded() -> Any | None:
    """The extension if this process has loaded it (None before :func:`load`, or without it)."""
    return _state.get("module")


def problem() -> str | None:
    """Why the native step is not in use (None when it is, or before :func:`load`)."""
    return _state.get("problem")


def _build(folder: Path, name: str) -> Any:
    from filelock import FileLock
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    # The ninja that torch's builder runs comes with this environment's packages; a program
    # started as .venv/bin/quant-tutor may not have that folder on its PATH.
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])

    def built() -> Any:
        return cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            build_directory=str(folder),
            # GCC 12 vectorizes 8 of prefill.cpp's loops at -O3, 4 at -O2. OpenMP: ATen's
            # parallel_for (matvec.cpp) is OpenMP pragmas in its header, one thread without it.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )

    # torch's builder marks a build with a lock file that it waits on for ever, and a process
    # killed while building (the app quit during its first load) leaves that file behind. An
    # OS lock dies with its process: whoever holds this one is the only builder alive, and
    # any lock file of torch's is a dead build's.
    with FileLock(str(folder.with_name(f"{folder.name}.flock"))):
        (folder / "lock").unlink(missing_ok=True)
        try:
            return built()
        except (ImportError, OSError):
            # A library that does not load (a process killed while linking it) is removed: this
            # process runs the Python loop, and the next one builds it afresh (torch's builder
            # does not build a name twice in one process).
            shutil.rmtree(folder, ignore_errors=True)
            raise


def layers_for(module: Any, decoder: Any, weights: Any) -> Any:
    """The extension's view of ``weights`` (a ``DecoderWeights``): each slot as the kernel it
    calls, or as itself to be called back in Python (taps, a part of an int4 weight, LLM.int8
    where bitsandbytes multiplies its codes natively)."""
    specs = [
        (
            *(
                _spec(getattr(lw, name))
                for name in ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")
            ),
            lw.ln1,
            lw.ln2,
        )
        for lw in weights.layers
    ]
    return module.make_layers(
        specs,
        decoder.n_heads,
        decoder.n_kv,
        decoder.head_dim,
        decoder.intermediate,
        decoder.eps,
        decoder.scaling,
    )


# How decode_step.cpp calls a slot: bitsandbytes' 4-bit kernel, oneDNN's packed linear, torch's
# weight-only int8 or int4 kernel, native/matvec.cpp (bf16 and 4-bit weights) or
# native/llm_int8.cpp (LLM.int8), up to the rows their slots use them for, or the slot itself
# back in Python (taps, a part of an int4 weight, LLM.int8 where bitsandbytes multiplies its
# codes natively).
FOUR_BIT, PACKED, PYTHON, INT8_PACK, INT4_PACK, ROWS, LLM_INT8 = 0, 1, 2, 3, 4, 5, 6


def _spec(slot: Any) -> tuple[Any, ...] | None:
    import ctypes

    from tutor.engine import int4
    from tutor.engine.int8wo import Int8WoLinear
    from tutor.engine.linears import (
        NATIVE_STEP_ROWS_INT8,
        PREFILL_ROWS,
        Bnb4bitCpuLinear,
        LlmInt8Linear,
        ModuleLinear,
        PackedLinear,
        RowsLinear,
    )

    if slot is None:
        return None
    if type(slot) is Bnb4bitCpuLinear:
        kernel = ctypes.cast(slot.function, ctypes.c_void_p).value
        sizes = (slot.out_features, slot.in_features, slot.blocksize)
        return (FOUR_BIT, slot.weight, slot.absmax, *sizes, kernel)
    if type(slot) is PackedLinear:
        return (PACKED, slot.weight, slot.bias)
    if type(slot) is RowsLinear:
        return (
            ROWS,
            slot.weight,
            slot.absmax,
            slot.table,
            slot.bias,
            slot.out_features,
            slot.blocksize,
            slot.max_rows,
            slot,
        )
    if type(slot) is LlmInt8Linear and slot.native is not None:
        return (LLM_INT8, slot.codes, slot.scales, slot.bias, slot.threshold, NATIVE_STEP_ROWS_INT8, slot)
    module = slot.module if type(slot) is ModuleLinear else None
    if type(module) is Int8WoLinear:
        shape = (module.out_features, module.in_features, 0, PREFILL_ROWS)
        return (INT8_PACK, module.codes, module.scales, *shape, slot)
    if type(module) is int4.Int4Linear:
        shape = (module.out_features, module.in_features, int4.GROUP, int4.dense_rows())
        return (INT4_PACK, module.packed, module.scales_zeros, *shape, slot)
    return (PYTHON, slot)
