"""GPTQ's calibration for ``gptq4``: its text, the pass that reads it, and the codes' cache.

The text is the shipped lessons' quizzes (stems, choices, feedback, explanations): drawn from the
lessons and about what they teach, yet none of it is in the lesson text the Lab scores, so the
Lab's figures for ``gptq4`` are measured on text it was not calibrated on.

The fast decoder reads all of it as one batch at bf16, its Linear slots tapped: each slot sees
its whole input once, so the moment a slot's input is seen its Hessian (Xᵀ X) is complete.
GPTQ rounds the rows of slots of one shape together (q|k|v stacked, as the decoder computes
them), as many at a time as ``BATCH_BYTES`` allow, as soon as that many Hessians are complete:
the pass holds no more than a batch of each shape (all 120 at once were 400 MB). Every layer is
calibrated on the bf16 model's own activations (not on those of the layers already rounded, as
the paper does layer by layer).

The codes are cached beside the model's other caches, keyed by the model, the text and the
settings; calibration runs once per machine.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from tutor.engine.decoder import FastDecoder
from tutor.engine.decoder_weights import DecoderWeights, slots, tapped
from tutor.engine.errors import EngineError
from tutor.engine.int4 import GROUP, Codes, gptq_batch
from tutor.engine.lock import EngineLock
from tutor.engine.row_modules import stacked

if TYPE_CHECKING:
    from tutor.engine.precision_manager import PrecisionManager

WINDOW = 128  # tokens per calibration window
# 32 windows spread over the quiz text (4,096 tokens), dampened by 0.03 of the Hessian's mean
# diagonal: measured against bf16 on 24 lesson windows (1,512 scored tokens), KL 0.112 in 38 s of
# calibration, where all 61 windows took 55 s for 0.131 at 0.1 and 0.112 at 0.03 (0.1 on these 32:
# 0.121); round-to-nearest int4 was 0.256 and nf4 0.231.
WINDOWS = 32
DAMP = 0.03
# Working memory of one batched GPTQ: it rounds as many same-shaped weights at once as fit, each
# taking about three float32 copies of its (K, K) Hessian and two of its (N, K) weight (three
# down_proj, seven gate_up). Ten down_proj at once were the calibration's peak, 270 MB over the pass.
BATCH_BYTES = 128 << 20
VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """What ``gptq4``'s codes were calibrated on, and what that took."""

    tokens: int
    windows: int
    seconds: float  # the pass and GPTQ, when they ran
    cached: bool  # read from the cache this time
    source: str = "the lessons' quiz text (questions, choices, feedback, explanations)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [
            s for key, value in node.items() if key not in ("id", "answer", "source") for s in _strings(value)
        ]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def calibration_text() -> str:
    """Every quiz's prose, lesson by lesson, in a stable order."""
    root = importlib.resources.files("tutor.lessons")
    parts = []
    for folder in sorted((f for f in root.iterdir() if f.is_dir()), key=lambda f: f.name):
        quiz = folder / "quiz.yaml"
        if quiz.is_file():
            parts.extend(_strings(yaml.safe_load(quiz.read_text(encoding="utf-8"))))
    if not parts:
        raise FileNotFoundError("no lesson quiz found to calibrate gptq4 on")
    return "\n\n".join(parts)


def calibration_windows(tokenizer: Any, text: str) -> list[list[int]]:
    """``WINDOWS`` windows of ``WINDOW`` tokens, spread evenly over ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    every = [ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
    if len(every) <= WINDOWS:
        return every
    return [every[i * len(every) // WINDOWS] for i in range(WINDOWS)]


def cache_path(cache_dir: Path, model: str, text: str) -> Path:
    key = {
        "model": model,
        "text": hashlib.sha256(text.encode()).hexdigest(),
        "window": WINDOW,
        "windows": WINDOWS,
    }
    key |= {"group": GROUP, "damp": DAMP, "version": VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / "quantized" / f"gptq4-{digest}.safetensors"


def _shape(masters: Mapping[str, nn.Linear], names: tuple[str, ...]) -> tuple[int, int]:
    """(rows, columns) of the weight GPTQ rounds for one decoder slot (q|k|v stacked)."""
    return sum(masters[n].out_features for n in names), masters[names[0]].in_features


def batch_of(shape: tuple[int, int]) -> int:
    """Weights of ``shape`` (rows, columns) per batched GPTQ."""
    rows, cols = shape
    return max(1, BATCH_BYTES // (4 * cols * (3 * cols + 2 * rows)))


def _batches(weights: DecoderWeights, masters: Mapping[str, nn.Linear]) -> int:
    """How many batched GPTQ runs calibration makes (its progress steps)."""
    counts: dict[tuple[int, int], int] = {}
    for _layer, _slot, names in slots(weights):
        shape = _shape(masters, names)
        counts[shape] = counts.get(shape, 0) + 1
    return sum(-(-count // batch_of(shape)) for shape, count in counts.items())


def calibrate(
    decoder: FastDecoder,
    weights: DecoderWeights,
    masters: Mapping[str, nn.Linear],
    windows: list[list[int]],
    step: Callable[[int, int], None] | None = None,
) -> tuple[dict[tuple[str, ...], Codes], Calibration]:
    """GPTQ codes for every decoder Linear (``masters``: the bf16 modules by name), from one
    tapped pass over ``windows`` with the bf16 ``weights``, GPTQ rounding the layers' q|k|v
    in batches, their o, and so on, each batch once its Hessians are complete (``BATCH_BYTES``).
    ``step(done, total)`` is called after each batch; it may raise to stop."""
    started = time.perf_counter()
    codes: dict[tuple[str, ...], Codes] = {}
    waiting: dict[tuple[int, int], dict[tuple[str, ...], torch.Tensor]] = {}  # Hessians by shape
    total, done = _batches(weights, masters), 0

    def round_rows(group: dict[tuple[str, ...], torch.Tensor]) -> None:
        nonlocal done
        chunk = list(group)
        weights_of = torch.stack([stacked(masters, names) for names in chunk])
        found = gptq_batch(weights_of, torch.stack([group.pop(names) for names in chunk]), damp=DAMP)
        codes.update(zip(chunk, found, strict=True))
        done += 1
        if step is not None:
            step(done, total)

    def see(names: tuple[str, ...], x: torch.Tensor) -> None:
        inputs = x.float()
        shape = _shape(masters, names)
        group = waiting.setdefault(shape, {})
        group[names] = inputs.T @ inputs
        if len(group) == batch_of(shape):  # GPTQ as the pass goes
            round_rows(group)

    ids = torch.tensor(windows, dtype=torch.long, device=decoder.device)
    with torch.inference_mode():
        decoder.forward(tapped(weights, see), ids, None, last_only=True)
        for group in waiting.values():
            if group:
                round_rows(group)
    tokens = int(ids.numel())
    return codes, Calibration(tokens, len(windows), round(time.perf_counter() - started, 1), cached=False)


def save(path: Path, codes: dict[tuple[str, ...], Codes], report: Calibration) -> None:
    from safetensors.torch import save

    from tutor.files import write_atomic

    tensors: dict[str, torch.Tensor] = {}
    for names, c in codes.items():
        key = ",".join(names)
        tensors[f"{key}|codes"] = (c.codes[:, 0::2] | (c.codes[:, 1::2] << 4)).contiguous()
        tensors[f"{key}|scale"] = c.scale.to(torch.bfloat16).contiguous()
        tensors[f"{key}|zero"] = c.zero.to(torch.bfloat16).contiguous()
    data = save(tensors, metadata={"calibration": json.dumps(report.as_dict())})

    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    write_atomic(path, write)


def _report(header: bytes) -> Calibration:
    metadata = json.loads(header)["__metadata__"]
    return Calibration(**{**json.loads(metadata["calibration"]), "cached": True})


def read_report(path: Path) -> Calibration | None:
    """What the cached codes at ``path`` were calibrated on (their header only), if any."""
    try:
        with path.open("rb") as handle:
            return _report(handle.read(int.from_bytes(handle.read(8), "little")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(path: Path) -> tuple[dict[tuple[str, ...], Codes], Calibration] | None:
    """The cached codes, or None when there are none (or they cannot be read: then they are
    computed again and the file rewritten)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        tensors = load(raw)
        report = _report(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        codes = {}
        for key in {name.rpartition("|")[0] for name in tensors}:
            packed = tensors[f"{key}|codes"]
            unpacked = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
            scale, zero = (tensors[f"{key}|{part}"].float() for part in ("scale", "zero"))
            codes[tuple(key.split(","))] = Codes(unpacked, scale, zero)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return codes, report


def cached_or_calibrated(
    path: Path,
    text: str,
    tokenizer: Any,
    decoder: FastDecoder,
    manager: PrecisionManager,
    step: Callable[[int, int], None] | None,
) -> tuple[dict[tuple[str, ...], Codes], Calibration]:
    """The codes cached at ``path``, or calibrated now on ``text`` against ``manager``'s bf16
    masters (``step`` as in ``calibrate``) and cached there."""
    cached = load(path)
    if cached is not None:
        return cached
    windows = calibration_windows(tokenizer, text)
    codes, report = calibrate(decoder, manager.reference_weights(), manager.masters, windows, step)
    save(path, codes, report)
    return codes, report


class GptqCodes:
    """gptq4's codes for one engine's model, and what they were calibrated on.

    ``engine.gptq``: ``report()`` says what gptq4 was calibrated on and how long that took
    (this run's calibration, or the cached codes'; None before either); ``calibrate(step)``
    calibrates now unless the codes are cached, holding the engine as a reply does; ``codes``
    is what the precision manager asks for when it builds gptq4.
    """

    def __init__(
        self,
        cache_root: Path | None,
        model: str,
        tokenizer: Any,
        decoder: FastDecoder | None,
        manager: PrecisionManager,
        lock: EngineLock,
    ) -> None:
        self.cache_root, self.model, self.tokenizer = cache_root, model, tokenizer
        self.decoder, self.manager, self.lock = decoder, manager, lock
        self.calibration: Calibration | None = None  # once calibrated or read from the cache
        if decoder is not None:
            manager.calibrated = self.codes

    def _cache(self, text: str) -> Path:
        from tutor.paths import cache_dir

        return cache_path(self.cache_root or cache_dir(), self.model, text)

    def report(self) -> Calibration | None:
        """What gptq4 was calibrated on and how long that took: this run's, or the cached codes'."""
        if self.calibration is not None:
            return self.calibration
        return read_report(self._cache(calibration_text()))

    def calibrate(self, step: Callable[[int, int], None] | None = None) -> Calibration:
        """Calibrate gptq4 now unless its codes are cached (``step(done, total)`` as it goes; it
        may raise to stop, and nothing is cached then), so a later switch only reads them."""
        if self.decoder is None:
            raise EngineError("gptq4 calibrates on the fast decoder, which this model does not run on.")
        with self.lock.held(True):
            self.codes(step)
        assert self.calibration is not None
        return self.calibration

    def codes(self, step: Callable[[int, int], None] | None = None) -> Mapping[tuple[str, ...], Codes]:
        """gptq4's codes: from the cache, or calibrated now (on the caller's thread, inside a
        build: no engine lock is taken here) and cached."""
        assert self.decoder is not None
        text = calibration_text()
        codes, self.calibration = cached_or_calibrated(
            self._cache(text), text, self.tokenizer, self.decoder, self.manager, step
        )
        return codes
