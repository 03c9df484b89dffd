"""The precisions the engine can switch between, and what each one means (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from tutor.engine.errors import UnsupportedPrecisionError


@dataclass(frozen=True)
class PrecisionInfo:
    name: str
    bits: float  # bits per decoder weight, quantization state not included
    label: str
    method: str
    quantized: bool
    # A precision that went through another and back to 16-bit storage ("no way back").
    restored_from: str | None = None
    first_build: str = ""  # what a first switch to it does beyond quantizing, if anything slow
    # Set for the precisions on torch's own weight-only kernels for CPUs: what to use elsewhere.
    off_cpu: str = ""


PRECISIONS: dict[str, PrecisionInfo] = {
    "fp32": PrecisionInfo(
        "fp32", 32, "float32", "the bf16 master weights upcast to float32 (no information gained)", False
    ),
    "bf16": PrecisionInfo("bf16", 16, "bfloat16", "the reference: the checkpoint as loaded", False),
    "int8": PrecisionInfo(
        "int8",
        8,
        "LLM.int8",
        "bitsandbytes Linear8bitLt: int8 rows with absmax scales; activation columns above the "
        "outlier threshold run in 16-bit",
        True,
    ),
    "nf4": PrecisionInfo(
        "nf4",
        4,
        "NF4",
        "bitsandbytes Linear4bit, NormalFloat4 codes in blocks of 64 with an absmax each, bf16 compute",
        True,
    ),
    "fp4": PrecisionInfo(
        "fp4",
        4,
        "FP4",
        "bitsandbytes Linear4bit, 4-bit float codes in blocks of 64 with an absmax each, bf16 compute",
        True,
    ),
    "int4": PrecisionInfo(
        "int4",
        4,
        "int4 RTN",
        "4-bit integer codes rounded to nearest, a bf16 scale and zero per 64 weights, on torch's "
        "int4 CPU kernel",
        True,
        off_cpu="nf4",
    ),
    "gptq4": PrecisionInfo(
        "gptq4",
        4,
        "GPTQ int4",
        "int4's grid and kernel, its codes chosen by GPTQ against what each layer read of the "
        "lessons' quiz text (calibrated once, cached)",
        True,
        # about half a minute on a 2-core CPU; later builds read the cached codes
        first_build="calibrated the first time: about half a minute",
        off_cpu="nf4",
    ),
    "int8-wo": PrecisionInfo(
        "int8-wo",
        8,
        "int8 weight-only",
        "int8 codes with a bf16 absmax scale per output row, bf16 activations, no outlier columns, "
        "on torch's weight-only int8 CPU kernel (not LLM.int8)",
        True,
        off_cpu="int8",
    ),
    "nf4-bf16": PrecisionInfo(
        "nf4-bf16",
        16,
        "NF4→bf16",
        "the NF4 weights dequantized into bf16 storage: 16-bit memory, the information of 4 bits",
        False,
        restored_from="nf4",
    ),
}

DEFAULT_PRECISION = "bf16"
# torch's int4 kernel (CPU only): round-to-nearest and GPTQ on one grid, the Lab's "calibration".
INT4 = ("int4", "gptq4")
# Precisions that run on torch's own weight-only kernels for CPUs, not on bitsandbytes.
TORCH_CPU_KERNELS = tuple(name for name, info in PRECISIONS.items() if info.off_cpu)
# What the Lab, `cliff`, `bench` and `eval --generate` measure: the reference, then the
# bitsandbytes precisions the lesson describes (fp32 only upcasts the reference, so it has
# nothing to show; nf4-bf16 and the int4 kernel's have their own sections).
MEASURED = (DEFAULT_PRECISION, "int8", "nf4", "fp4")
NO_WAY_BACK = (DEFAULT_PRECISION, "nf4", "nf4-bf16")
CALIBRATION = ("nf4", *INT4)


def check_precision(name: str) -> str:
    """Normalise a precision name ("BF16", " nf4", "nf4→bf16") or raise UnsupportedPrecisionError."""
    key = name.strip().lower().replace("→", "-")
    if key not in PRECISIONS:
        known = ", ".join(PRECISIONS)
        raise UnsupportedPrecisionError(f"Unknown precision {name!r}; choose one of: {known}.")
    return key


def parse_precisions(text: str) -> list[str]:
    """Parse a comma-separated list such as ``"bf16,int8,nf4"``."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise UnsupportedPrecisionError("No precision given; for example: bf16,int8,nf4,fp4.")
    return [check_precision(n) for n in names]
