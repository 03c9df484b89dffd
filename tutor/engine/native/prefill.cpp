// Reading a prompt on a CPU: causal attention over it, and int4's weight unpacked for one dense
// matmul. Built with decode_step.cpp into one extension by tutor/engine/native_step.py.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "vector_math.h"

namespace {

using vector_math::from_bf16;
using vector_math::to_bf16;

// One query's probabilities over its first `valid` keys (zeros after, to `length`), from its
// scores given as two bf16 parts (high + low) and scaled by `scale`.
VECTOR_CLONES void softmax_row(const uint16_t* high, const uint16_t* low, uint16_t* out, int64_t valid,
                               int64_t length, float scale, float* scores) {
  for (int64_t j = 0; j < valid; ++j) scores[j] = (from_bf16(high[j]) + from_bf16(low[j])) * scale;
  vector_math::softmax(scores, valid);
  for (int64_t j = 0; j < valid; ++j) out[j] = to_bf16(scores[j]);
  for (int64_t j = valid; j < length; ++j) out[j] = 0;
}

// Rows b0..b0+block of an int4 weight, transposed into `out` (K, N): torch's CPU packing keeps
// each block of rows as, for every column, block/2 bytes (low nibbles the block's first half of
// rows, high nibbles its second), and a (scale, zero) pair per group of a row (scales_zeros
// (K/group, N, 2)); a weight is (code - 8) * scale + zero, in float32, then rounded to bf16.
VECTOR_CLONES void unpack_block(const uint8_t* packed, const uint16_t* scales_zeros, uint16_t* out, int64_t k_size,
                                int64_t n_size, int64_t group, int64_t block, int64_t b0) {
  const int64_t half = block / 2;
  for (int64_t k = 0; k < k_size; ++k) {
    const uint8_t* bytes = packed + k * half;
    for (int64_t h = 0; h < 2; ++h) {
      const uint16_t* pairs = scales_zeros + ((k / group) * n_size + b0 + h * half) * 2;
      uint16_t* row = out + k * n_size + b0 + h * half;
      const int shift = 4 * static_cast<int>(h);
      for (int64_t j = 0; j < half; ++j) {
        const int code = (bytes[j] >> shift) & 15;
        row[j] = to_bf16(static_cast<float>(code - 8) * from_bf16(pairs[2 * j]) + from_bf16(pairs[2 * j + 1]));
      }
    }
  }
}

}  // namespace

// Causal attention of a prompt read from position 0: q (batch, heads, steps, dim), k and v
// (batch, kv_heads, steps, dim), all bf16, no padding. SDPA's CPU kernel took 4.4 ms a layer of
// SmolLM2 for a 600-token prompt on an AVX-512 EPYC (134 of a 310 ms first token); this takes
// 2.3. It multiplies in bf16 (oneDNN), `chunk` queries at a time against only the keys they see: a score is the bf16 product plus a second bf16 product
// of what that rounding left (so about float32's precision), the softmax is float32, and the
// probabilities are bf16, as SDPA's are.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             int64_t chunk) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "prefill_attention takes bf16");
  TORCH_CHECK(q.size(2) == k.size(2) && k.size(2) == v.size(2), "prefill_attention reads a prompt from position 0");
  const int64_t batch = q.size(0), heads = q.size(1), steps = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t most = kv_heads * group * std::min(chunk, steps);  // score rows of one chunk
  // One workspace for every chunk (scores' two parts, probabilities, their values, a row of
  // float scores): the allocator maps pages afresh for each large block it is asked for.
  auto space = at::empty({3, most * steps}, q.options());
  auto mixed = at::empty({most * dim}, q.options());
  auto floats = at::empty({steps}, q.options().dtype(at::kFloat));
  // (batch, steps, heads, dim) in memory, as SDPA's own output: the caller's view of it as one
  // row per position is then free.
  auto out = at::empty({batch, steps, heads, dim}, q.options()).transpose(1, 2);
  const auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
  for (int64_t b = 0; b < batch; ++b) {
    auto grouped = q[b].view({kv_heads, group, steps, dim});
    auto written = out[b].view({kv_heads, group, steps, dim});
    for (int64_t start = 0; start < steps; start += chunk) {
      const int64_t end = std::min(steps, start + chunk), rows = end - start, total = kv_heads * group * rows;
      auto queries = grouped.slice(2, start, end).reshape({kv_heads, group * rows, dim});
      auto keys = k[b].slice(1, 0, end).transpose(1, 2);
      auto high = space[0].narrow(0, 0, total * end).view({kv_heads, group * rows, end});
      auto low = space[1].narrow(0, 0, total * end).view({kv_heads, group * rows, end});
      auto probs = space[2].narrow(0, 0, total * end).view({kv_heads, group * rows, end});
      at::bmm_out(high, queries, keys);
      at::baddbmm_out(low, high, queries, keys, -1, 1);  // the product less its bf16 rounding
      const uint16_t *h = bits(high), *l = bits(low);
      uint16_t* p = bits(probs);
      for (int64_t row = 0; row < total; ++row) {
        softmax_row(h + row * end, l + row * end, p + row * end, start + row % rows + 1, end,
                    static_cast<float>(scale), floats.data_ptr<float>());
      }
      auto values = mixed.narrow(0, 0, total * dim).view({kv_heads, group * rows, dim});
      at::bmm_out(values, probs, v[b].slice(1, 0, end));
      written.slice(2, start, end).copy_(values.view({kv_heads, group, rows, dim}));
    }
  }
  return out;
}

// int4's weight (tutor.engine.int4.Int4Linear.dequantized, bf16) transposed, (K, N), from its
// packed codes (N, K/2) and scales_zeros (K/group, N, 2), packed in blocks of `block` rows. Its
// values are the Python's bit for bit; it takes half the time of the six ATen passes there.
at::Tensor int4_weight_t(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t k_size, int64_t group,
                         int64_t block) {
  TORCH_CHECK(packed.is_contiguous() && scales_zeros.is_contiguous() && scales_zeros.scalar_type() == at::kBFloat16,
              "int4_weight_t takes contiguous codes and bf16 scales");
  const int64_t n_size = packed.size(0);
  TORCH_CHECK(n_size % block == 0 && k_size % group == 0, "int4_weight_t takes whole blocks and groups");
  auto out = at::empty({k_size, n_size}, scales_zeros.options());
  const auto* codes = packed.data_ptr<uint8_t>();
  const auto* pairs = reinterpret_cast<const uint16_t*>(scales_zeros.data_ptr<at::BFloat16>());
  auto* weight = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t b = 0; b < n_size / block; ++b) {
    unpack_block(codes + b * k_size * (block / 2), pairs, weight, k_size, n_size, group, block, b * block);
  }
  return out;
}
