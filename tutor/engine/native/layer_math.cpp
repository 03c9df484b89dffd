// A decoder layer's elementwise parts for bf16 rows on a CPU, each one loop instead of a handful
// of ATen operations: RMSNorm (ATen: two conversions, the norm, a product), silu(gate) * up, and
// a decode step's rotary embedding with its writes into the KV cache (a roll, two products, a
// sum, slices and two copies). At nf4 on a 2-core AVX2 EPYC such small operations took about 7
// of a token's 24 ms (`quant-tutor bench --profile`: "other ops", "norms"). The decode step
// (decode_step.cpp) and the Python loop (tutor.engine.decoder) both call the norm and the MLP's
// product, so they stay the same bit for bit; the rotation is ATen's, rounding for rounding.
// Each is named to the profiler (quant_tutor::*), so that `quant-tutor bench --profile` counts it.
#include "layer_math.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "vector_math.h"

namespace {

using vector_math::from_bf16;
#if AVX2_CODE
using vector_math::from_bf16x8;
using vector_math::round_bf16x8;
#endif
using vector_math::to_bf16;

constexpr int64_t ROW_GRAIN = 8;  // rows per thread at least

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// ``x`` as (rows, last) with its last dim contiguous (a view where it can be).
at::Tensor as_rows(const at::Tensor& x) {
  auto rows = x.reshape({-1, x.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

VECTOR_CLONES void rms_row(const uint16_t* x, const uint16_t* weight, int64_t n, float eps, uint16_t* out) {
  const int64_t whole = n - n % vector_math::LANES;
  float sums[vector_math::LANES] = {};
  for (int64_t i = 0; i < whole; i += vector_math::LANES)
    for (int64_t l = 0; l < vector_math::LANES; ++l) sums[l] += from_bf16(x[i + l]) * from_bf16(x[i + l]);
  float sum = 0.0f;
  for (int64_t l = 0; l < vector_math::LANES; ++l) sum += sums[l];
  for (int64_t i = whole; i < n; ++i) sum += from_bf16(x[i]) * from_bf16(x[i]);
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = to_bf16(from_bf16(weight[i]) * from_bf16(to_bf16(from_bf16(x[i]) * scale)));
  }
}

// silu(g) = g * sigmoid(g), sigmoid from exp(-|g|) so that exp's argument is never positive;
// rounded to bf16, then times up (to be rounded).
INTO_CALLER float silu_times(float g, float up) {
  const float e = vector_math::exp_nonpositive(-std::fabs(g));
  const float sigmoid = (g >= 0.0f ? 1.0f : e) / (1.0f + e);
  return from_bf16(to_bf16(g * sigmoid)) * up;
}

#if AVX2_CODE
// The same for 8 values in AVX2. The plain loop as per-CPU clones (VECTOR_CLONES; GCC reported
// its AVX2 clone vectorized) took 13-24 µs for a row of 1536 on a 2-core AVX2 EPYC, where
// ATen's two ops took 6-9; this takes 5.
TARGET_AVX2 __m256 exp_nonpositive_x8(__m256 x) {  // vector_math::exp_nonpositive's steps
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift), shift);
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f),
                                   _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

TARGET_AVX2 __m256 silu_times_x8(__m256 g, __m256 up) {
  const __m256 e = exp_nonpositive_x8(_mm256_or_ps(_mm256_set1_ps(-0.0f), g));  // of -|g|
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 top = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
  const __m256 silu = round_bf16x8(_mm256_mul_ps(g, _mm256_div_ps(top, _mm256_add_ps(one, e))));
  return round_bf16x8(_mm256_mul_ps(silu, up));
}

// 16 rounded floats stored as their bf16 bits.
TARGET_AVX2 void store_bf16x16(__m256 low, __m256 high, uint16_t* out) {
  const __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(low), 16),
                                             _mm256_srli_epi32(_mm256_castps_si256(high), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xD8));
}

TARGET_AVX2 int64_t silu_mul_avx2(const uint16_t* gate, const uint16_t* up, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    store_bf16x16(silu_times_x8(from_bf16x8(gate + i), from_bf16x8(up + i)),
                  silu_times_x8(from_bf16x8(gate + i + 8), from_bf16x8(up + i + 8)), out + i);
  }
  return i;
}
#endif

void silu_mul_row(const uint16_t* gate, const uint16_t* up, int64_t n, uint16_t* out) {
  int64_t done = 0;
#if AVX2_CODE
  if (vector_math::avx2_fma()) {
    done = silu_mul_avx2(gate, up, n, out);
  }
#endif
  for (int64_t i = done; i < n; ++i) {
    out[i] = to_bf16(silu_times(from_bf16(gate[i]), from_bf16(up[i])));
  }
}

void check_bf16(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), what, " must be bf16 on the CPU");
}

}  // namespace

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("quant_tutor::rms_norm", std::vector<c10::IValue>());
  check_bf16(x, "rms_norm's input");
  check_bf16(weight, "rms_norm's weight");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == n, "rms_norm's weight has ", n, " values");
  const auto rows = as_rows(x);
  auto out = at::empty({rows.size(0), n}, x.options());
  const uint16_t *from = bits(rows), *w = bits(weight);
  uint16_t* to = bits(out);
  at::parallel_for(0, rows.size(0), ROW_GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rms_row(from + r * rows.stride(0), w, n, static_cast<float>(eps), to + r * n);
    }
  });
  return out.view(x.sizes());
}

at::Tensor silu_mul_bf16(const at::Tensor& gate, const at::Tensor& up) {
  RECORD_FUNCTION("quant_tutor::silu_mul", std::vector<c10::IValue>());
  check_bf16(gate, "silu_mul's gate");
  check_bf16(up, "silu_mul's up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate ", gate.sizes(), " and up ", up.sizes());
  const auto g = as_rows(gate), u = as_rows(up);
  const int64_t n = g.size(1);
  auto out = at::empty({g.size(0), n}, gate.options());
  const uint16_t *gs = bits(g), *us = bits(u);
  uint16_t* to = bits(out);
  at::parallel_for(0, g.size(0), ROW_GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      silu_mul_row(gs + r * g.stride(0), us + r * u.stride(0), n, to + r * n);
    }
  });
  return out.view(gate.sizes());
}

at::Tensor rotate_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& layer_cache, int64_t position, int64_t heads, int64_t kv_heads,
                             int64_t dim) {
  RECORD_FUNCTION("quant_tutor::rotate_into_cache", std::vector<c10::IValue>());
  check_bf16(qkv, "the rotation's qkv");
  check_bf16(cos, "cos");
  check_bf16(sin, "sin");
  check_bf16(layer_cache, "the KV cache");
  const int64_t rows = qkv.size(0), width = (heads + 2 * kv_heads) * dim;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width && qkv.is_contiguous(), "qkv is (rows, ", width, ")");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == dim && sin.numel() == dim,
              "cos and sin have ", dim, " values each");
  TORCH_CHECK(layer_cache.dim() == 5 && layer_cache.size(1) == rows && layer_cache.size(2) == kv_heads &&
                  layer_cache.size(4) == dim && layer_cache.stride(4) == 1 && position < layer_cache.size(3),
              "a layer's KV cache is (2, ", rows, ", ", kv_heads, ", max_len, ", dim, ")");
  auto q = at::empty({rows, heads, 1, dim}, qkv.options());
  const uint16_t *from = bits(qkv), *c = bits(cos), *s = bits(sin);
  uint16_t *queries = bits(q), *cache = reinterpret_cast<uint16_t*>(layer_cache.data_ptr());
  const int64_t half = dim / 2;
  // Where head h of row r goes: a query's row of q, a key's or value's position in the cache.
  auto target = [&](int64_t r, int64_t h) -> uint16_t* {
    if (h < heads) return queries + (r * heads + h) * dim;
    const int64_t which = h < heads + kv_heads ? 0 : 1, head = h - heads - which * kv_heads;
    return cache + which * layer_cache.stride(0) + r * layer_cache.stride(1) + head * layer_cache.stride(2) +
           position * layer_cache.stride(3);
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads + 2 * kv_heads; ++h) {
      const uint16_t* x = from + r * width + h * dim;
      uint16_t* out = target(r, h);
      if (h >= heads + kv_heads) {  // a value: as it is
        for (int64_t i = 0; i < dim; ++i) out[i] = x[i];
        continue;
      }
      for (int64_t i = 0; i < dim; ++i) {
        const float turned = from_bf16(to_bf16(from_bf16(x[i]) * from_bf16(c[i])));
        const float rolled = from_bf16(to_bf16(from_bf16(x[(i + half) % dim]) * from_bf16(s[i])));
        out[i] = to_bf16(turned + rolled);
      }
    }
  }
  return q;
}
