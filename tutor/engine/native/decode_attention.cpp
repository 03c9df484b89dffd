// A decode step's attention on a CPU: one new position per row over the KV cache, read in place
// as bf16, in float32 arithmetic. The ATen version (tutor.engine.attention.one_query_attention's
// own ops) converts every cached key and value to float32 at every step and layer: after a
// 350-token prompt at nf4 that was about 2.5 of a token's 5.7 ms. Built with decode_step.cpp
// into one extension by tutor/engine/native_step.py; both the native step and the Python loop
// call it (through one_query_attention), so they stay the same bit for bit.
#include "decode_attention.h"

#include <ATen/record_function.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace {

// Up to this many cached positions: beyond it the float32 ATen ops, which use both cores, are
// as fast (a layer of SmolLM2, an AVX-512 EPYC: 11 µs against 29 over 113 positions, 33 against
// 42 over 350, 65 against 64 over 700).
constexpr int64_t DECODE_ATTENTION_MOST = 640;

using vector_math::from_bf16;
using vector_math::to_bf16;

// Partial sums of a key's dot product with the query: 8 keeps the adds that join them short.
constexpr int64_t DOT_LANES = 8;

// One query head over `end` keys and values (positions `key_stride` / `value_stride` apart,
// `dim` contiguous), `keep` (or null) hiding positions; its output rounded to bf16. `scores`
// holds `end` floats and `mixed` `dim`.
VECTOR_CLONES void attend(const uint16_t* query, const uint16_t* keys, int64_t key_stride, const uint16_t* values,
                          int64_t value_stride, const bool* keep, int64_t end, int64_t dim, float scale,
                          float* scores, float* mixed, uint16_t* out) {
  for (int64_t d = 0; d < dim; ++d) mixed[d] = from_bf16(query[d]);  // the query, as float
  for (int64_t j = 0; j < end; ++j) {
    const uint16_t* key = keys + j * key_stride;
    float partial[DOT_LANES] = {};
    for (int64_t d = 0; d < dim; d += DOT_LANES)
      for (int64_t l = 0; l < DOT_LANES; ++l) partial[l] += mixed[d + l] * from_bf16(key[d + l]);
    float dot = 0.0f;
    for (int64_t l = 0; l < DOT_LANES; ++l) dot += partial[l];
    scores[j] = keep == nullptr || keep[j] ? dot * scale : -INFINITY;
  }
  vector_math::softmax(scores, end);
  if (keep != nullptr) {  // exp(-87) is not quite 0: a hidden position gets none of the weight
    for (int64_t j = 0; j < end; ++j) scores[j] = keep[j] ? scores[j] : 0.0f;
  }
  for (int64_t d = 0; d < dim; ++d) mixed[d] = 0.0f;
  for (int64_t j = 0; j < end; ++j) {
    const uint16_t* value = values + j * value_stride;
    const float weight = scores[j];
    for (int64_t d = 0; d < dim; ++d) mixed[d] += weight * from_bf16(value[d]);
  }
  for (int64_t d = 0; d < dim; ++d) out[d] = to_bf16(mixed[d]);
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "decode_attention takes bf16");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = k.size(1), end = k.size(2), group = heads / kv_heads;
  TORCH_CHECK(q.size(2) == 1 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && dim % DOT_LANES == 0,
              "decode_attention takes one query per row, each head's dim contiguous, a multiple of 8");
  at::Tensor keep;
  if (mask) {
    keep = mask->to(at::kBool).expand({rows, 1, 1, end}).contiguous();
  }
  auto out = at::empty({rows, heads, 1, dim}, q.options());
  std::vector<float> scores(end), mixed(dim);
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  const uint16_t *qs = bits(q), *ks = bits(k), *vs = bits(v);
  auto* written = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t r = 0; r < rows; ++r) {
    const bool* row_keep = mask ? keep.data_ptr<bool>() + r * end : nullptr;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / group;
      attend(qs + r * q.stride(0) + h * q.stride(1), ks + r * k.stride(0) + g * k.stride(1), k.stride(2),
             vs + r * v.stride(0) + g * v.stride(1), v.stride(2), row_keep, end, dim, static_cast<float>(scale),
             scores.data(), mixed.data(), written + (r * heads + h) * dim);
    }
  }
  return out;
}

at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale) {
  RECORD_FUNCTION("quant_tutor::one_query_attention", std::vector<c10::IValue>());  // for bench --profile
  if (q.scalar_type() == at::kBFloat16 && k.size(2) <= DECODE_ATTENTION_MOST) {
    return decode_attention(q, k, v, mask, scale);
  }
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(3), kv_heads = k.size(1);
  auto grouped = q.reshape({rows, kv_heads, heads / kv_heads, dim}).to(at::kFloat);
  auto scores = at::matmul(grouped, k.to(at::kFloat).transpose(-1, -2)).mul_(scale);
  if (mask) {
    scores.masked_fill_(mask->logical_not(), -std::numeric_limits<double>::infinity());
  }
  return at::matmul(scores.softmax(-1), v.to(at::kFloat)).reshape({rows, heads, 1, dim}).to(q.scalar_type());
}
