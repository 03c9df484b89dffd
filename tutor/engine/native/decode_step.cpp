// One decode step of a Llama decoder's layers, as one call: FastDecoder.forward's loop for one
// new position per row (tutor/engine/decoder.py), with the same operations in the same order,
// so its output is the Python loop's bit for bit: ATen's, or in bf16 the loops of
// native/layer_math.cpp, which the Python loop calls too (the norm, the MLP's product) or which
// round as its ATen ops round (the rotation). On a CPU a step runs about 30 small operations a
// layer, and calling each from Python cost as much as the arithmetic (README: "A decode step in
// one native call"). Built once per machine by tutor/engine/native_step.py.
#include <ATen/ATen.h>
#include <torch/python.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "decode_attention.h"
#include "layer_math.h"
#include "llm_int8.h"
#include "matvec.h"

#include <optional>
#include <string>
#include <vector>

namespace {

// bitsandbytes' AVX-512 BF16 4-bit matmul (tutor.engine.linears.Bnb4bitCpuLinear): rows, n, k,
// input, packed codes, absmax, output, block size, input row stride, output row stride.
using Kernel4bit = void (*)(int64_t, int64_t, int64_t, const void*, const void*, const void*, void*,
                            int64_t, int64_t, int64_t);

// int8-wo and int4 (tutor.engine.int8wo, tutor.engine.int4) call torch's weight-only kernels up
// to ``max_rows`` rows, as their modules do, a bf16 or 4-bit weight on a CPU without bf16
// matmul (tutor.engine.linears.RowsLinear) native/matvec.cpp, and LLM.int8 where its int8
// matmul is emulated (tutor.engine.linears.LlmInt8Linear) native/llm_int8.cpp; above it their
// modules multiply otherwise, so the slot is called back.
enum Kind : int64_t {
  kFourBit = 0,
  kPacked = 1,
  kPython = 2,
  kInt8Pack = 3,
  kInt4Pack = 4,
  kRows = 5,
  kLlmInt8 = 6
};

struct Slot {
  int64_t kind = kPython;
  at::Tensor weight;  // 4-bit: the packed codes; packed: oneDNN's weight; int8/int4: the codes
  at::Tensor extra;   // 4-bit: the absmax (bf16); packed: the bias (undefined: none); int8/int4:
                      // the scales (and zeros); rows: the absmax (float32) of a 4-bit weight;
                      // LLM.int8: the scale of each row of codes
  std::optional<at::Tensor> bias;  // rows, LLM.int8: the bias, if any
  at::Tensor table;   // rows: a 4-bit weight's code values (undefined: a bf16 weight)
  int64_t n = 0, k = 0, blocksize = 0, max_rows = 0;
  double threshold = 0;  // LLM.int8: an input this large or larger is an outlier
  Kernel4bit kernel = nullptr;
  py::object call;  // any other slot (and int8/int4 over max_rows rows), called back in Python

  at::Tensor operator()(const at::Tensor& input) const {
    if (kind == kFourBit) {
      at::Tensor x = input;
      if (x.scalar_type() != at::kBFloat16 || !x.is_contiguous()) {
        x = x.to(at::kBFloat16).contiguous();
      }
      auto out = at::empty({x.size(0), n}, x.options());
      kernel(x.size(0), n, k, x.data_ptr(), weight.data_ptr(), extra.data_ptr(), out.data_ptr(),
             blocksize, k, n);
      return out;
    }
    if (kind == kPacked) {
      static const auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      std::vector<c10::IValue> stack{input, weight,
                                     extra.defined() ? c10::IValue(extra) : c10::IValue(),
                                     std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                     std::string("")};
      op.callBoxed(&stack);
      return stack[0].toTensor();
    }
    if ((kind == kInt8Pack || kind == kInt4Pack) && input.size(0) <= max_rows) {
      auto x = input.reshape({-1, k}).to(at::kBFloat16);
      auto out = kind == kInt8Pack ? at::_weight_int8pack_mm(x, weight, extra)
                                   : at::_weight_int4pack_mm_for_cpu(x, weight, blocksize, extra);
      return out.to(input.scalar_type()).view({input.size(0), n});
    }
    if (kind == kRows && input.size(0) <= max_rows) {
      auto out = table.defined() ? four_bit_matvec(input, weight, extra, table, n, blocksize, bias)
                                 : bf16_matvec(input, weight, bias);
      return out.to(input.scalar_type());
    }
    if (kind == kLlmInt8 && input.size(0) <= max_rows) {
      return llm_int8_linear(input, weight, extra, bias, threshold);
    }
    py::gil_scoped_acquire gil;
    return call(input).cast<at::Tensor>();
  }
};

struct Layer {
  std::optional<Slot> qkv, q, k, v, gate_up, gate, up;
  Slot o, down;
  at::Tensor ln1, ln2;
};

struct Layers {
  std::vector<Layer> layers;
  int64_t heads, kv_heads, dim, intermediate;
  double eps, scaling;
};

bool bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// tutor.engine.decoder.FastDecoder._rms and _silu_mul: native/layer_math.cpp's for bf16.
at::Tensor rms(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (bf16(x) && bf16(weight)) {
    return rms_norm_bf16(x, weight, eps);
  }
  auto h = at::rms_norm(x.to(at::kFloat), {x.size(-1)}, std::nullopt, eps);
  return weight * h.to(x.scalar_type());
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  return bf16(gate) && bf16(up) ? silu_mul_bf16(gate, up) : at::silu(gate) * up;
}

std::optional<Slot> slot_of(const py::object& spec) {
  if (spec.is_none()) {
    return std::nullopt;
  }
  auto t = spec.cast<py::tuple>();
  Slot slot;
  slot.kind = t[0].cast<int64_t>();
  if (slot.kind == kFourBit) {
    slot.weight = t[1].cast<at::Tensor>();
    slot.extra = t[2].cast<at::Tensor>();
    slot.n = t[3].cast<int64_t>();
    slot.k = t[4].cast<int64_t>();
    slot.blocksize = t[5].cast<int64_t>();
    slot.kernel = reinterpret_cast<Kernel4bit>(t[6].cast<intptr_t>());
  } else if (slot.kind == kPacked) {
    slot.weight = t[1].cast<at::Tensor>();
    if (!t[2].is_none()) {
      slot.extra = t[2].cast<at::Tensor>();
    }
  } else if (slot.kind == kInt8Pack || slot.kind == kInt4Pack) {
    slot.weight = t[1].cast<at::Tensor>();
    slot.extra = t[2].cast<at::Tensor>();
    slot.n = t[3].cast<int64_t>();
    slot.k = t[4].cast<int64_t>();
    slot.blocksize = t[5].cast<int64_t>();
    slot.max_rows = t[6].cast<int64_t>();
    slot.call = t[7];
  } else if (slot.kind == kRows) {
    slot.weight = t[1].cast<at::Tensor>();
    if (!t[2].is_none()) {
      slot.extra = t[2].cast<at::Tensor>();
      slot.table = t[3].cast<at::Tensor>();
    }
    slot.bias = t[4].cast<std::optional<at::Tensor>>();  // None: no bias
    slot.n = t[5].cast<int64_t>();
    slot.blocksize = t[6].cast<int64_t>();
    slot.max_rows = t[7].cast<int64_t>();
    slot.call = t[8];
  } else if (slot.kind == kLlmInt8) {
    slot.weight = t[1].cast<at::Tensor>();
    slot.extra = t[2].cast<at::Tensor>();
    slot.bias = t[3].cast<std::optional<at::Tensor>>();
    slot.threshold = t[4].cast<double>();
    slot.max_rows = t[5].cast<int64_t>();
    slot.call = t[6];
  } else {
    slot.call = t[1];
  }
  return slot;
}

// layers: per layer (qkv, q, k, v, o, gate_up, gate, up, down, ln1, ln2), each slot None or a
// tuple made by native_step._slot_spec.
Layers make_layers(const py::list& specs, int64_t heads, int64_t kv_heads, int64_t dim,
                   int64_t intermediate, double eps, double scaling) {
  Layers out{{}, heads, kv_heads, dim, intermediate, eps, scaling};
  for (const auto& item : specs) {
    auto t = item.cast<py::tuple>();
    Layer layer;
    layer.qkv = slot_of(t[0]);
    layer.q = slot_of(t[1]);
    layer.k = slot_of(t[2]);
    layer.v = slot_of(t[3]);
    layer.o = *slot_of(t[4]);
    layer.gate_up = slot_of(t[5]);
    layer.gate = slot_of(t[6]);
    layer.up = slot_of(t[7]);
    layer.down = *slot_of(t[8]);
    layer.ln1 = t[9].cast<at::Tensor>();
    layer.ln2 = t[10].cast<at::Tensor>();
    out.layers.push_back(std::move(layer));
  }
  return out;
}

// The stream ``x`` (rows, hidden) after every layer, for one new position per row at ``start``
// (the cache's length), writing each layer's keys and values into ``cache`` (layers, 2, rows,
// kv_heads, max_len, dim). ``cos``/``sin`` are (1, 1, 1, dim); ``mask`` (rows, 1, 1, start + 1)
// hides each row's padding, or is None.
at::Tensor step(const Layers& self, at::Tensor x, const at::Tensor& cache, int64_t start,
                const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& mask) {
  py::gil_scoped_release nogil;
  at::NoGradGuard no_grad;
  const int64_t rows = x.size(0), heads = self.heads, kv = self.kv_heads, dim = self.dim;
  const int64_t end = start + 1;
  for (size_t index = 0; index < self.layers.size(); ++index) {
    const Layer& lw = self.layers[index];
    auto h = rms(x, lw.ln1, self.eps);
    at::Tensor qkv = lw.qkv ? (*lw.qkv)(h) : at::cat({(*lw.q)(h), (*lw.k)(h), (*lw.v)(h)}, -1);
    auto layer_cache = cache.select(0, static_cast<int64_t>(index));
    at::Tensor q;
    if (bf16(qkv) && bf16(cos) && bf16(cache)) {
      q = rotate_into_cache(qkv.contiguous(), cos, sin, layer_cache, start, heads, kv, dim);
    } else {
      qkv = qkv.view({rows, 1, heads + 2 * kv, dim});
      auto qk = qkv.slice(2, 0, heads + kv);
      qk = qk * cos + qk.roll({dim / 2}, {-1}) * sin;
      q = qk.slice(2, 0, heads).transpose(1, 2);
      layer_cache.select(0, 0).slice(2, start, end).copy_(qk.slice(2, heads).transpose(1, 2));
      layer_cache.select(0, 1).slice(2, start, end).copy_(qkv.slice(2, heads + kv).transpose(1, 2));
    }
    auto keys = layer_cache.select(0, 0).slice(2, 0, end);
    auto values = layer_cache.select(0, 1).slice(2, 0, end);
    // tutor.engine.attention.one_query_attention
    auto attn = one_query_attention(q, keys, values, mask, self.scaling);
    // FastDecoder._after_attention
    x = x + lw.o(attn.transpose(1, 2).reshape({rows, heads * dim}));
    h = rms(x, lw.ln2, self.eps);
    at::Tensor gate, up;
    if (lw.gate_up) {
      auto both = (*lw.gate_up)(h);
      gate = both.slice(1, 0, self.intermediate);
      up = both.slice(1, self.intermediate);
    } else {
      gate = (*lw.gate)(h);
      up = (*lw.up)(h);
    }
    x = x + lw.down(silu_mul(gate, up));
  }
  return x;
}

}  // namespace

// native/prefill.cpp
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             int64_t chunk);
at::Tensor int4_weight_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t k_size, int64_t group,
                         int64_t block);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Layers>(m, "Layers");
  m.def("make_layers", &make_layers);
  m.def("step", &step);
  m.def("prefill_attention", &prefill_attention, py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention, py::call_guard<py::gil_scoped_release>());
  m.def("one_query_attention", &one_query_attention, py::call_guard<py::gil_scoped_release>());
  m.def("int4_weight_t", &int4_weight_t, py::call_guard<py::gil_scoped_release>());
  m.def("bf16_matvec", &bf16_matvec, py::call_guard<py::gil_scoped_release>());
  m.def("four_bit_matvec", &four_bit_matvec, py::call_guard<py::gil_scoped_release>());
  m.def("avx2_int8_gemm", &avx2_int8_gemm);
  m.def("llm_int8_linear", &llm_int8_linear, py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm_bf16, py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul_bf16, py::call_guard<py::gil_scoped_release>());
}
