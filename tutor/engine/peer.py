"""A peer in the benchmark: llama.cpp decoding the very GGUF file the app ships, in the same run.

``make bench-peer`` builds llama.cpp's Python binding (llama-cpp-python) into the virtual
environment; it is not a dependency of the app. It builds from source, for this CPU's
instruction sets named one by one: ``GGML_NATIVE=ON`` (let the compiler probe the CPU) died with
"Illegal instruction" on an AMX Xeon, while ``GGML_NATIVE=OFF`` with the flags set explicitly
worked (issue 14), so ``cmake_args`` reads the flags from ``/proc/cpuinfo``.

The peer reads the same prompt tokens (the engine's chat template applied once, for both) and
decodes greedily for the same number of tokens on the same number of threads, each of its
replies right after one of the engine's; TTFT and decode speed are measured the way the
engine's reply stats are.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor.engine.errors import EngineError

PEERS = ("llama.cpp",)
VERSION = "0.3.36"
NOT_INSTALLED = (
    f"llama.cpp's Python binding is not installed: `make bench-peer` builds llama-cpp-python {VERSION} "
    "into .venv (several minutes) and runs the benchmark with it."
)
# /proc/cpuinfo flag -> the ggml CMake option that turns that instruction set on
GGML_FLAGS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx_vnni": "GGML_AVX_VNNI",
    "amx_tile": "GGML_AMX_TILE",
    "amx_int8": "GGML_AMX_INT8",
    "amx_bf16": "GGML_AMX_BF16",
}


def cmake_args(cpu_flags: Sequence[str]) -> str:
    """CMAKE_ARGS for llama-cpp-python on a CPU with ``cpu_flags`` (as /proc/cpuinfo names them)."""
    have = set(cpu_flags)
    options = [
        "-DGGML_NATIVE=OFF",
        *(f"-D{option}=ON" for flag, option in GGML_FLAGS.items() if flag in have),
    ]
    return " ".join(options)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


@dataclass
class LlamaCpp:
    """llama.cpp with the GGUF loaded, its replies timed between the engine's."""

    llm: Any
    gguf: Path
    threads: int
    load_s: float
    version: str

    def arrivals(self, prompt_ids: Sequence[int], count: int) -> list[float]:
        """When each of ``count`` greedy tokens arrived, from the start (the prompt read afresh)."""
        self.llm.reset()
        begin = time.perf_counter()
        arrived: list[float] = []
        for _token in self.llm.generate(list(prompt_ids), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            arrived.append(time.perf_counter() - begin)
            if len(arrived) == count:
                break
        return arrived


def open_llama_cpp(gguf: Path, context_tokens: int, threads: int) -> LlamaCpp:
    """llama.cpp on ``gguf`` with room for ``context_tokens``."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError(NOT_INSTALLED) from exc
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=context_tokens, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    return LlamaCpp(llm, gguf, threads, time.perf_counter() - started, getattr(llama_cpp, "__version__", "?"))


def decode_tok_s(arrived: Sequence[float]) -> float | None:
    """Tokens after the first over the time they took, as the engine's reply stats count them."""
    decode_s = arrived[-1] - arrived[0]
    return round((len(arrived) - 1) / decode_s, 2) if decode_s > 0 else None


def llama_cpp_row(
    peer: LlamaCpp,
    replies: Sequence[Sequence[float]],
    prompt_tokens: int,
    long_ttft_s: float | None,
    long_tokens: int | None,
) -> dict[str, Any]:
    """The peer's bench row from its timed ``replies`` (arrival times): the medians of their
    decode speeds and first tokens; its speed is the one every row is a multiple of."""
    runs = [decode_tok_s(arrived) for arrived in replies]
    rates = [rate for rate in runs if rate is not None]
    return {
        "engine": "llama.cpp",
        "precision": peer.gguf.stem.rsplit(".", 1)[-1],  # the GGUF's own type, e.g. Q4_1
        "device": "cpu",
        "weights_mib": round(peer.gguf.stat().st_size / (1 << 20), 1),
        "ttft_s": round(statistics.median(arrived[0] for arrived in replies), 4),
        "ttft_long_s": long_ttft_s,
        "long_prompt_tokens": long_tokens,
        "decode_tok_s": round(statistics.median(rates), 2) if rates else None,
        "decode_runs": runs,
        "decode_vs_peer": 1.0,
        "rounds": len(replies),
        "tokens": len(replies[0]),
        "prompt_tokens": prompt_tokens,
        "threads": peer.threads,
        "load_s": round(peer.load_s, 3),
        "peer_version": peer.version,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m tutor.engine.peer --cmake-args``: what ``make bench-peer`` builds with."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--cmake-args"]:
        sys.stderr.write("usage: python -m tutor.engine.peer --cmake-args\n")
        return 2
    sys.stdout.write(cmake_args(cpu_flags()) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
