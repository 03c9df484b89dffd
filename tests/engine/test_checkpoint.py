"""The direct GGUF conversion (tutor.engine.gguf_*) against transformers' own GGUF loading.

The converted folder must hold what transformers itself makes of the embedded GGUF file:

- weights: the reference is ``load_gguf_checkpoint(..., return_tensors=True)``, the function
  ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` loads a llama GGUF with
  (from_pretrained itself also wants ``accelerate``, which this project does not install). It
  dequantizes to float32; the folder is bf16, so every tensor must equal the reference rounded to
  bf16, bit for bit: both sides dequantize the same blocks with the same float32 arithmetic (gguf's
  dequantizers), the Q/K un-permutation only moves values, and both round to nearest even.
- config: ``AutoConfig.from_pretrained(folder, gguf_file=name)``, field by field.
- tokenizer: ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``: the same ids on a set of
  texts and on the chat template, the same special tokens, and the same tokenizer.json.

transformers parses the file with gguf's GGUFReader for each of the three (seconds each), so the
reference fixture memoizes GGUFReader while it builds them: one parse, same results. The test
module takes about 30 s of CPU time, most of it transformers' reference loading.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tutor.engine.checkpoint import (
    CONVERTER_VERSION,
    MANIFEST,
    WEIGHTS_FILE,
    convert_gguf,
    embedded_gguf_path,
)
from tutor.engine.reports import LoadProgress

TEXTS = [
    "What does quantization do to a neural network?",
    "  Leading spaces,\ttabs\nand newlines\r\n\n   trailing   ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, emoji 🤖🚀👍🏽",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint([f(i) for i in range(10)])\n",
    'int8 vs nf4: {"bits": 4, "scale": 0.0123}; 1234567890 3.14159e-10',
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><repo_name>",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are a tutor."},
    {"role": "user", "content": "What is NF4?"},
    {"role": "assistant", "content": "A 4-bit data type."},
    {"role": "user", "content": "And int8? 🙂"},
]


Converted = tuple[Path, list[LoadProgress]]  # the folder, and the progress events of converting it


@dataclass
class Reference:
    config: Any
    tokenizer: Any
    tensors: dict[str, Any]
    tokenizer_json: dict[str, Any]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return embedded_gguf_path()


@pytest.fixture(scope="module")
def converted(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    events: list[LoadProgress] = []
    dest = convert_gguf(gguf_file, tmp_path_factory.mktemp("converted") / "model", progress=events.append)
    return dest, events


@pytest.fixture(scope="module")
def shared_reader(gguf_file: Path) -> Iterator[Any]:
    """gguf.GGUFReader (and gguf.get_tensor_name_map, which transformers rebuilds for every
    submodule while mapping names) memoized while the module's tests run: same results, one
    parse of the file instead of three, and seconds less of name mapping."""
    import functools

    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def memoized(path: Any, mode: Any = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", memoized)
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield memoized


@pytest.fixture(scope="module")
def reference(gguf_file: Path, shared_reader: Any, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)["tensors"]
    saved = tmp_path_factory.mktemp("reference-tokenizer")
    tokenizer.save_pretrained(str(saved))
    tokenizer_json = json.loads((saved / "tokenizer.json").read_text())
    return Reference(config, tokenizer, tensors, tokenizer_json)


@pytest.mark.model
def test_weights_equal_transformers_gguf_loading(
    converted: Converted, reference: Reference, gguf_file: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from tutor.engine.gguf_dequantize import dequantize, to_bf16
    from tutor.engine.gguf_reader import read_gguf

    folder, _ = converted
    mine = load_file(str(folder / WEIGHTS_FILE))
    assert sorted(mine) == sorted(reference.tensors)
    assert len(mine) == 30 * 9 + 2  # 30 layers, embeddings and final norm; lm_head is tied
    for name, expected in reference.tensors.items():
        assert expected.dtype == torch.float32, name
        got = mine[name]
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape, name
        assert torch.equal(got.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16)), name
    # The permutation matters (so the check above would catch a missing one): llama.cpp's Q rows
    # differ from Hugging Face's.
    parsed = read_gguf(gguf_file)
    (q_info,) = [t for t in parsed.tensors if t.name == "blk.0.attn_q.weight"]
    as_stored = to_bf16(dequantize(parsed, q_info))
    assert not torch.equal(as_stored, mine["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.model
def test_config_equals_transformers_gguf_config(converted: Converted, reference: Reference) -> None:
    import torch
    from transformers import AutoConfig

    folder, _ = converted
    mine = AutoConfig.from_pretrained(str(folder))
    assert type(mine) is type(reference.config)
    assert mine.dtype == torch.bfloat16
    ignored = {"_name_or_path", "dtype", "transformers_version"}
    got = {k: v for k, v in mine.to_dict().items() if k not in ignored}
    expected = {k: v for k, v in reference.config.to_dict().items() if k not in ignored}
    assert got == expected
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_parameters",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(mine, field) == getattr(reference.config, field), field
    assert (mine.vocab_size, mine.num_hidden_layers, mine.tie_word_embeddings) == (49152, 30, True)


@pytest.mark.model
def test_tokenizer_equals_transformers_gguf_tokenizer(converted: Converted, reference: Reference) -> None:
    from transformers import AutoTokenizer

    folder, _ = converted
    mine = AutoTokenizer.from_pretrained(str(folder))
    ref = reference.tokenizer
    assert type(mine) is type(ref)
    assert json.loads((folder / "tokenizer.json").read_text()) == reference.tokenizer_json
    assert mine.get_vocab() == ref.get_vocab() and len(mine) == len(ref) == 49152
    for text in TEXTS:
        ids = mine(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert mine.decode(ids) == ref.decode(ids), text
    prompt = str(mine.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False))
    assert prompt == ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = mine.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ref.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == mine(prompt, add_special_tokens=False)["input_ids"]
    for attribute in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(mine, attribute) == getattr(ref, attribute), attribute
    assert (mine.bos_token_id, mine.eos_token_id, mine.unk_token_id, mine.pad_token_id) == (1, 2, 0, 2)
    assert sorted(mine.all_special_ids) == sorted(ref.all_special_ids)
    assert mine.chat_template == ref.chat_template


@pytest.mark.model
def test_reader_agrees_with_gguf_reader(gguf_file: Path, shared_reader: Any) -> None:
    from tutor.engine.gguf_reader import read_gguf

    parsed = read_gguf(gguf_file)
    reader = shared_reader(gguf_file)
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(parsed.metadata) == list(fields)
    for name, field in fields.items():
        assert parsed.metadata[name] == field.contents(), name
    assert len(parsed.tensors) == len(reader.tensors) == 272
    for mine, theirs in zip(parsed.tensors, reader.tensors, strict=True):
        assert mine.name == theirs.name
        assert mine.shape == tuple(reversed(theirs.shape.tolist()))
        assert mine.ggml_type == int(theirs.tensor_type)
        assert (mine.offset, mine.nbytes) == (theirs.data_offset, theirs.n_bytes)


@pytest.mark.model
def test_conversion_reports_each_tensor_and_writes_a_manifest(converted: Converted) -> None:
    folder, events = converted
    assert {event.stage for event in events} == {"convert"}
    dones = [event.done for event in events]
    assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == events[-1].total == 272 + 2
    assert all(event.total == 274 for event in events)
    assert sum("dequantizing blk." in event.message for event in events) == 270
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["converter"] == CONVERTER_VERSION and manifest["dtype"] == "bfloat16"
    assert set(manifest["files"]) >= {WEIGHTS_FILE, "config.json", "tokenizer.json", "generation_config.json"}


# --- the reader and the fast-path check on small synthetic files (no model) ----------------------


def _write_gguf(path: Path, arch: str = "llama", *, extra: dict[str, Any] | None = None) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -5)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_int32("test.i32", -7)
    writer.add_float32("test.f32", 0.1)
    writer.add_uint64("test.u64", 2**40)
    writer.add_int64("test.i64", -(2**40))
    writer.add_float64("test.f64", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_string("test.str", "naïve 日本")
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.strs", ["a", "", "ü b"])
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("blk.0.attn_norm.weight", np.arange(64, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reader_reads_every_value_type(tmp_path: Path) -> None:
    import gguf

    from tutor.engine.gguf_dequantize import dequantize
    from tutor.engine.gguf_reader import read_gguf

    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    parsed = read_gguf(path)
    reader = gguf.GGUFReader(str(path))
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            assert parsed.metadata[name] == field.contents(), name
    assert parsed.metadata["test.f32"] == float(np.float32(0.1)) and parsed.metadata["test.f64"] == 0.1
    assert parsed.metadata["test.strs"] == ["a", "", "ü b"] and parsed.metadata["test.ints"] == [1, 2, 3]
    embd = next(t for t in parsed.tensors if t.name == "token_embd.weight")
    assert embd.shape == (4, 64)
    values = dequantize(parsed, embd)
    assert values.flags.writeable and np.array_equal(
        values, np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64)
    )


def test_reader_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    from tutor.engine.gguf_reader import GGUFFormatError, read_gguf

    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    data = path.read_bytes()
    for cut in (3, 30, len(data) // 2, len(data) - 1):
        short = tmp_path / f"cut-{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError):
            read_gguf(short)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFFormatError):
        read_gguf(empty)


def test_files_the_fast_path_does_not_cover_say_why(tmp_path: Path) -> None:
    from tutor.engine.gguf_convert import fast_path_problem
    from tutor.engine.gguf_reader import read_gguf

    other = tmp_path / "other.gguf"
    _write_gguf(other, "qwen2")
    assert "architecture 'qwen2'" in str(fast_path_problem(read_gguf(other)))
    llama = tmp_path / "llama.gguf"
    _write_gguf(llama)  # no tokenizer in it
    assert "metadata lacks" in str(fast_path_problem(read_gguf(llama)))


def test_unsupported_files_use_the_generic_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tutor.engine import checkpoint

    path = tmp_path / "other.gguf"
    _write_gguf(path, "qwen2")
    calls: list[tuple[Path, Path]] = []
    monkeypatch.setattr(
        checkpoint, "_write_generic_conversion", lambda g, out, progress: calls.append((g, out))
    )
    monkeypatch.setattr(checkpoint, "_write_fast_conversion", lambda *args: pytest.fail("fast path used"))
    checkpoint._write_conversion(path, tmp_path / "out", None)
    # a GGUF version (or byte order) this reader does not take goes to gguf's own reader too
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    checkpoint._write_conversion(v1, tmp_path / "out", None)
    assert calls == [(path, tmp_path / "out"), (v1, tmp_path / "out")]
