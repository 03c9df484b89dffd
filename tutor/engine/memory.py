"""Measured memory: bytes held by tensors and modules, resident set size, CUDA peaks."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tutor.engine.precision_manager import PrecisionManager


def tensor_bytes(tensors: Iterable[Any], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors``: views of one buffer count it once, whole."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        try:
            storage = t.untyped_storage()
            key, size = int(storage.data_ptr()) or id(t), int(storage.nbytes())
        except (RuntimeError, NotImplementedError):  # opaque layouts (oneDNN packed) have no plain storage
            key, size = id(t), t.numel() * t.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += size
    return total


def quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors inside a bitsandbytes QuantState (absmax, code, nested state...)."""
    import torch

    found: list[torch.Tensor] = []
    if state is None:
        return found
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None) if name in vars(state) else None
        if isinstance(value, torch.Tensor):
            found.append(value)
    nested = vars(state).get("state2")
    if nested is not None:
        found.extend(quant_state_tensors(nested))
    return found


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a module computes with: parameters, buffers and bitsandbytes state."""
    tensors: list[torch.Tensor] = []
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            tensors.append(p.data)
            tensors.extend(quant_state_tensors(getattr(p, "quant_state", None)))
            for extra in ("CB", "SCB"):
                value = getattr(p, extra, None)
                if value is not None:
                    tensors.append(value)
        tensors.extend(b for b in sub.buffers(recurse=False))
        state = getattr(sub, "state", None)  # Linear8bitLt keeps CB / SCB here after its first call
        for extra in ("CB", "SCB"):
            value = getattr(state, extra, None) if state is not None else None
            if value is not None:
                tensors.append(value)
    return tensors


def module_bytes(module: torch.nn.Module, seen: set[int] | None = None) -> int:
    return tensor_bytes(module_tensors(module), seen)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (the OS's own high-water mark)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(int(peak if sys.platform == "darwin" else peak * 1024), rss_bytes())
    except (ImportError, AttributeError):  # Windows
        import psutil

        info: Any = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def give_back_freed() -> None:
    """Hand the heap's freed pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A measurement frees gigabytes in pieces below glibc's mmap threshold, which stay in the
    process's heap: without this, each phase of the full Lab plan started where the last one
    peaked (5.2 GB at the end here, against 4.1 GB with it)."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


# The resident set after give_back_freed_when_grown's last trim (one heap per process).
_trimmed_at = 0
# How much the process may grow between two trims: without them each of the Lab's reads lands
# in heap that earlier phases left (full plan peak 2.26-2.31 GiB; with them 2.00-2.08).
TRIM_STEP = 128 * 1024 * 1024


def give_back_freed_when_grown(step: int = TRIM_STEP) -> None:
    """``give_back_freed`` once the resident set has grown by ``step`` bytes since the last trim
    here (before each window read and each Lab QA answer). A trim walks the whole heap, 20-90 ms
    once the Lab's phases have fragmented it: one before every read of the easy-vs-hard and
    mixed precision sections took their peaks from 2.21 and 2.31 GiB to 1.83 and 2.11 but cost
    8 s, so a read trims only when the process has grown."""
    global _trimmed_at
    if rss_bytes() - _trimmed_at > step:
        give_back_freed()
        _trimmed_at = rss_bytes()


# glibc's mallopt parameter, and the bounds of its own sliding mmap threshold (64-bit)
M_MMAP_THRESHOLD = -3
MAPPED_FROM = 128 * 1024
DYNAMIC_MAX = 32 * 1024 * 1024


@contextlib.contextmanager
def large_blocks_mapped() -> Iterator[None]:
    """Inside, every block of 128 KiB or more comes straight from the OS and goes back when freed.

    LLM.int8 reading a long prompt frees tens of thousands of blocks of many sizes, which
    glibc's heap keeps and cannot reuse: reading 256, 1,024 and 2,048 tokens at int8 grew the
    heap by 1.4 GB here while torch's allocations peaked at 122 MB. Mapping them costs a page
    fault per page (a 600-token int8 prompt read 0.5 s -> 0.85 s with a 4 MiB threshold), so
    only the Lab's long reads run inside; after, large blocks stay in the heap as they do once
    glibc's own sliding threshold has reached its maximum, which any long prompt makes it do.

    The heap is trimmed on the way in and out. A block glibc can place in a free chunk of the
    heap goes there, not to its own mapping, and after the Lab's earlier phases the heap holds
    hundreds of MB of free chunks whose pages a trim gave back: a read landing there touches
    them again (the memory section of the full plan peaked at 2.12-2.18 GiB, under 1.97 with
    the trims; the section took 12.8-13.2 s either way)."""
    give_back_freed()
    try:
        with blocks_mapped():
            yield
    finally:
        give_back_freed()


@contextlib.contextmanager
def blocks_mapped() -> Iterator[None]:
    """Inside, blocks of 128 KiB or more come straight from the OS (``large_blocks_mapped``
    without its trims: for tensors made once and kept a while, which in the heap would leave
    their scratch's pages the process's after it is freed)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, DYNAMIC_MAX)


@functools.cache
def _glibc(name: str) -> Any:
    """A glibc function from the symbols already in this process, once (None elsewhere)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # another C library (musl) has none
        return None


# oneDNN keeps every matmul it has set up, 1,024 by default, and each new prompt length sets up
# new ones: by the end of the Lab's table they held 215 MB more (mallinfo's bytes in use).
# A reply's decoding reuses a handful, and a prompt's native attention (native/prefill.cpp)
# three for each 128 of its tokens: with 16 kept, a 600-token prompt set up its 28 afresh at
# every read (the first token in 0.37-0.44 s against 0.23 with 32 or 64 kept).
KERNEL_CACHE = "64"


def bound_kernel_cache() -> None:
    """Bound oneDNN's cache of set-up matmuls (read when it first sets one up; a value in the
    environment wins)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE)


def available_bytes(device: str) -> int:
    """Memory still free on ``device`` (RAM for cpu)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def memory_mib(manager: PrecisionManager, device: torch.device) -> dict[str, float | None]:
    """Measured memory now, in MiB: the current weights, the bf16 masters, the prepared
    precisions and their bound, the process's resident set (now and at its peak), CUDA's."""
    import torch

    from tutor.engine.reports import mib

    cuda = device.type == "cuda"
    return {
        "weights_mib": manager.weights_report(None).weights_mib,
        "master_mib": mib(manager.master_bytes),
        "prepared_mib": mib(manager.prepared_bytes()),
        "prepared_limit_mib": mib(manager.limit_bytes),
        "rss_mib": mib(rss_bytes()),
        "peak_rss_mib": mib(peak_rss_bytes()),
        "cuda_allocated_mib": mib(torch.cuda.memory_allocated(device)) if cuda else None,
    }
