// LLM.int8's linear for CPUs where bitsandbytes only emulates its int8 matmul (no AVX-512): it
// multiplies float32 copies of the codes, made at every call, through a float32 GEMM. Here the
// codes are multiplied as integers, exactly: a decode step's few rows by native/matvec.cpp's
// int8 kernel, a prompt's rows by a GEMM of AVX2's 16-bit multiply-adds (vpmaddwd: 16
// multiply-adds an instruction, where float32 FMA does 8), whose output is finished in the same
// pass (dequantized, the outlier columns added, rounded to bf16). On a 2-core AVX2 EPYC the
// integer product of 600 rows by a 3072x576 weight took 13 ms against the float32 GEMM's 28.
// The elementwise steps (the fp16 copy, the outlier columns, each row's absmax, the codes) are
// vectorized too: as ATen operations they were a fifth of an int8 prompt's time.
#include "llm_int8.h"

#include "matvec.h"
#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#if AVX2_CODE
#define TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#endif

namespace {

using at::indexing::Slice;

constexpr float DEQUANTIZE = 6.200124e-05f;  // 1 / 127^2, as bitsandbytes writes it
constexpr int64_t SPAN = 16;                 // the GEMM's step along k: 16 int16 lanes
constexpr int64_t TILE_ROWS = 4;             // rows sharing each read of two outputs' codes
constexpr int64_t BLOCK = 96;                // outputs whose codes stay in L2 while the rows go by

bool avx2_f16c() {
#if AVX2_CODE
  static const bool has = vector_math::avx2_fma() && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// The input's rows quantized as LlmInt8Linear quantizes them.
struct Quantized {
  std::vector<int16_t> codes;  // (m, k): round(x * (1 / absmax * 127)), 0 in the held-back columns
  std::vector<float> absmax;   // (m): of the fp16 copy, without the values past the threshold
  std::vector<int64_t> held;   // the columns with a value past the threshold
};

// What turns a row's integer sums into its outputs (the held-back columns: a prompt's GEMM only).
struct Finish {
  const float* absmax;  // (m)
  const float* scales;  // (n)
  const float* bias;    // (n), or null
  const float* held_x;  // (m, c): the input in the held-back columns
  const float* held_w;  // (c, n): their weights, dequantized and rounded to the input's dtype
  int64_t c, n;
};

// ATen rounds a float to int8 through an int32 in which NaN (0 * inf: a row of zeros) is 0.
int16_t code_of(float scaled) { return std::isnan(scaled) ? 0 : static_cast<int16_t>(std::nearbyint(scaled)); }

// NaN-propagating maximum, as ATen's amax.
float max_of(float a, float b) { return std::isnan(a) || a >= b ? a : b; }

// The steps as loops over an fp16 copy made by ATen (any input dtype, any CPU).
Quantized quantize_plain(const at::Tensor& rows, float limit, bool outliers) {
  const int64_t m = rows.size(0), k = rows.size(1);
  const auto copy = rows.to(at::kHalf).to(at::kFloat).contiguous();  // ATen's conversions are vectorized
  const float* half = copy.data_ptr<float>();
  Quantized q{std::vector<int16_t>(static_cast<size_t>(m * k)), std::vector<float>(static_cast<size_t>(m)), {}};
  std::vector<char> is_held(static_cast<size_t>(k), 0);
  if (outliers) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        is_held[j] |= static_cast<char>(std::fabs(half[r * k + j]) >= limit);
      }
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    const float* row = half + r * k;
    float top = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const float magnitude = std::fabs(row[j]);
      top = max_of(top, is_held[j] && magnitude >= limit ? 0.0f : magnitude);
    }
    q.absmax[r] = top;
    const float scale = (1.0f / top) * 127.0f;
    for (int64_t j = 0; j < k; ++j) {
      q.codes[r * k + j] = is_held[j] ? 0 : code_of(row[j] * scale);
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    if (is_held[j]) {
      q.held.push_back(j);
    }
  }
  return q;
}

#if AVX2_CODE
TARGET_AVX2_F16C __m256 magnitude_x8(__m256 v) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}

// The same steps 8 values at a time for contiguous bf16 rows, k a multiple of 8: the fp16
// rounding by F16C, the same comparisons, maxima and rounding.
TARGET_AVX2_F16C Quantized quantize_avx2(const uint16_t* x, int64_t m, int64_t k, float limit, bool outliers) {
  Quantized q{std::vector<int16_t>(static_cast<size_t>(m * k)), std::vector<float>(static_cast<size_t>(m)), {}};
  std::vector<float> half(static_cast<size_t>(m * k));
  std::vector<float> held_mask(static_cast<size_t>(k), 0.0f);  // all bits set in a held-back column
  const __m256 past = _mm256_set1_ps(limit);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < k; j += 8) {
      const __m128i as_half = _mm256_cvtps_ph(vector_math::from_bf16x8(x + r * k + j), _MM_FROUND_TO_NEAREST_INT);
      const __m256 h = _mm256_cvtph_ps(as_half);
      _mm256_storeu_ps(half.data() + r * k + j, h);
      if (outliers) {
        const __m256 held = _mm256_or_ps(_mm256_loadu_ps(held_mask.data() + j),
                                         _mm256_cmp_ps(magnitude_x8(h), past, _CMP_GE_OQ));
        _mm256_storeu_ps(held_mask.data() + j, held);
      }
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    const float* row = half.data() + r * k;
    __m256 top = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8) {
      const __m256 magnitude = magnitude_x8(_mm256_loadu_ps(row + j));
      const __m256 left_out = _mm256_and_ps(_mm256_loadu_ps(held_mask.data() + j),
                                            _mm256_cmp_ps(magnitude, past, _CMP_GE_OQ));
      const __m256 counted = _mm256_andnot_ps(left_out, magnitude);
      top = _mm256_max_ps(top, counted);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(counted, counted, _CMP_UNORD_Q));
    }
    alignas(32) float tops[8];
    _mm256_store_ps(tops, top);
    float largest = *std::max_element(tops, tops + 8);
    if (_mm256_movemask_ps(nan) != 0) {
      largest = NAN;
    }
    q.absmax[r] = largest;
    const __m256 scale = _mm256_set1_ps((1.0f / largest) * 127.0f);
    for (int64_t j = 0; j < k; j += 8) {
      __m256 scaled = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), scale),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      scaled = _mm256_andnot_ps(_mm256_loadu_ps(held_mask.data() + j), scaled);
      scaled = _mm256_and_ps(scaled, _mm256_cmp_ps(scaled, scaled, _CMP_ORD_Q));  // NaN: 0
      const __m256i ints = _mm256_cvttps_epi32(scaled);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(ints, ints), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + r * k + j), _mm256_castsi256_si128(packed));
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    if (held_mask[j] != 0.0f) {  // all bits set: a NaN, never equal to 0
      q.held.push_back(j);
    }
  }
  return q;
}

// Each of 8 vectors' lanes summed: [sum(v[0]), ..., sum(v[7])].
TARGET_AVX2 __m256i lane_sums(const __m256i* v) {
  const __m256i ab = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i cd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

// R rows of codes (int16, row stride k) times two outputs' codes (int8, row stride k): the sum for
// row r and output o at lanes[2 r + o].
template <int R>
TARGET_AVX2 void tile(const int16_t* xs, int64_t k, const int8_t* w, int32_t* lanes) {
  __m256i acc[2 * TILE_ROWS];
  for (auto& a : acc) {
    a = _mm256_setzero_si256();
  }
  for (int64_t i = 0; i < k; i += SPAN) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + i)));
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + r * k + i));
      acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(w0, x));
      acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(w1, x));
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), lane_sums(acc));
}

// Outputs [begin, end) of row r (a multiple of 8 of them) from their sums: as LlmInt8Linear's ATen
// operations compute them, ((absmax * scale) * sum) * DEQUANTIZE (+ bias) rounded to bf16; then the
// held-back columns' products, summed in float32 in column order, added and rounded again.
TARGET_AVX2 void finish_row(const Finish& f, int64_t r, const int32_t* sums, int64_t begin, int64_t end,
                            uint16_t* out) {
  const __m256 absmax = _mm256_set1_ps(f.absmax[r]);
  for (int64_t j = begin; j < end; j += 8) {
    const __m256 sum = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + j - begin)));
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(absmax, _mm256_loadu_ps(f.scales + j)), sum),
                             _mm256_set1_ps(DEQUANTIZE));
    if (f.bias != nullptr) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(f.bias + j));
    }
    v = vector_math::round_bf16x8(v);
    if (f.c > 0) {
      // Each product of two bf16 values is exact in float32: FMA rounds as a product and a sum.
      __m256 dot = _mm256_setzero_ps();
      for (int64_t l = 0; l < f.c; ++l) {
        dot = _mm256_fmadd_ps(_mm256_set1_ps(f.held_x[r * f.c + l]), _mm256_loadu_ps(f.held_w + l * f.n + j), dot);
      }
      v = vector_math::round_bf16x8(_mm256_add_ps(v, dot));
    }
    const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * f.n + j), _mm256_castsi256_si128(packed));
  }
}

// Rows [first, first + R) times outputs [begin, end), finished into ``out``.
template <int R>
TARGET_AVX2 void rows_times_block(const int16_t* xs, int64_t k, const int8_t* w, int64_t first, int64_t begin,
                                  int64_t end, const Finish& f, uint16_t* out) {
  alignas(32) int32_t sums[TILE_ROWS][BLOCK];
  alignas(32) int32_t lanes[2 * TILE_ROWS];
  for (int64_t j = begin; j < end; j += 2) {
    tile<R>(xs + first * k, k, w + j * k, lanes);
    for (int r = 0; r < R; ++r) {
      sums[r][j - begin] = lanes[2 * r];
      sums[r][j - begin + 1] = lanes[2 * r + 1];
    }
  }
  for (int r = 0; r < R; ++r) {
    finish_row(f, first + r, sums[r], begin, end, out);
  }
}

// A prompt's rows: the integer product in blocks of BLOCK outputs (one per thread at a time),
// TILE_ROWS rows at once, each block finished as it is summed.
void gemm(const Quantized& q, int64_t m, int64_t k, const int8_t* w, int64_t n, const Finish& f, uint16_t* out) {
  RECORD_FUNCTION("quant_tutor::gemm_int8", std::vector<c10::IValue>());
  const int16_t* xs = q.codes.data();
  at::parallel_for(0, (n + BLOCK - 1) / BLOCK, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t b = first_block; b < last_block; ++b) {
      const int64_t begin = b * BLOCK, end = std::min(n, begin + BLOCK);
      for (int64_t first = 0; first < m; first += TILE_ROWS) {
        switch (std::min(m - first, TILE_ROWS)) {
          case 1: rows_times_block<1>(xs, k, w, first, begin, end, f, out); break;
          case 2: rows_times_block<2>(xs, k, w, first, begin, end, f, out); break;
          case 3: rows_times_block<3>(xs, k, w, first, begin, end, f, out); break;
          default: rows_times_block<4>(xs, k, w, first, begin, end, f, out); break;
        }
      }
    }
  });
}
#endif

// The held-back columns: the input's values in them (m, c) and their weights (n, c), dequantized
// as bitsandbytes dequantizes them and rounded to the input's dtype.
std::pair<at::Tensor, at::Tensor> held_columns(const Quantized& q, const at::Tensor& rows, const at::Tensor& codes,
                                               const at::Tensor& scales) {
  const auto columns = at::tensor(q.held, rows.options().dtype(at::kLong));
  const auto weight = codes.index({Slice(), columns}) * scales.view({-1, 1}) * 7.874015718698502e-3;
  return {rows.index({Slice(), columns}), weight.to(rows.scalar_type())};
}

// A decode step's rows: the integer product by native/matvec.cpp, the dequantization in float32
// and the held-back columns by ATen's addmm, as LlmInt8Linear's ATen operations compute them.
at::Tensor few_rows(const Quantized& q, const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scales,
                    const Finish& f) {
  const int64_t m = rows.size(0), k = rows.size(1), n = f.n;
  auto product = at::empty({m, n}, rows.options().dtype(at::kInt));
  int32_t* sums = product.data_ptr<int32_t>();
  int8_sums(q.codes.data(), m, k, codes.data_ptr<int8_t>(), n, sums);
  at::Tensor out;
#if AVX2_CODE
  if (rows.scalar_type() == at::kBFloat16 && n % 8 == 0 && vector_math::avx2_fma()) {
    // Straight to bf16, rounded as the float32 loop below and ATen's conversion round them: one
    // row through SmolLM2's 210 linears' shapes took 11.3-15.2 ms against 12.4-16.3 that way
    // (four runs of 15 alternated calls, one process, 2-core AVX2 EPYC).
    out = at::empty({m, n}, rows.options());
    for (int64_t r = 0; r < m; ++r) {
      finish_row(f, r, sums + r * n, 0, n, reinterpret_cast<uint16_t*>(out.data_ptr()));
    }
  }
#endif
  if (!out.defined()) {
    out = at::empty({m, n}, rows.options().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        float value = f.absmax[r] * f.scales[j] * static_cast<float>(sums[r * n + j]) * DEQUANTIZE;
        if (f.bias != nullptr) {
          value += f.bias[j];
        }
        o[r * n + j] = value;
      }
    }
    out = out.to(rows.scalar_type());
  }
  if (q.held.empty()) {
    return out;
  }
  const auto [held_x, held_w] = held_columns(q, rows, codes, scales);
  return out.addmm(held_x, held_w.t());
}

at::Tensor many_rows(const Quantized& q, const at::Tensor& rows, const at::Tensor& codes, const at::Tensor& scales,
                     Finish f) {
  const int64_t m = rows.size(0), k = rows.size(1), n = f.n;
  TORCH_CHECK(avx2_int8_gemm(k, n) && rows.scalar_type() == at::kBFloat16, "LLM.int8 over ", m,
              " rows wants AVX2, bf16 rows, k a multiple of 16 and n of 8 (k ", k, ", n ", n, ")");
  at::Tensor held_x, held_w;
  if (!q.held.empty()) {
    const auto [x_held, w_held] = held_columns(q, rows, codes, scales);
    held_x = x_held.to(at::kFloat).contiguous();
    held_w = w_held.to(at::kFloat).t().contiguous();
    f.held_x = held_x.data_ptr<float>();
    f.held_w = held_w.data_ptr<float>();
    f.c = static_cast<int64_t>(q.held.size());
  }
  auto out = at::empty({m, n}, rows.options());
#if AVX2_CODE
  gemm(q, m, k, codes.data_ptr<int8_t>(), n, f, reinterpret_cast<uint16_t*>(out.data_ptr()));
#endif
  return out;
}

}  // namespace

bool avx2_int8_gemm(int64_t k, int64_t n) { return avx2_f16c() && k % SPAN == 0 && n % 8 == 0; }

at::Tensor llm_int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, double threshold) {
  RECORD_FUNCTION("quant_tutor::llm_int8", std::vector<c10::IValue>());
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(),
              "LLM.int8's codes are a contiguous (n, k) int8 tensor");
  const int64_t n = codes.size(0), k = codes.size(1);
  const auto rows = x.reshape({-1, k}).contiguous();
  const int64_t m = rows.size(0);
  // The threshold compared as fp16, as bitsandbytes compares its fp16 copy.
  const float limit = static_cast<float>(c10::Half(static_cast<float>(threshold)));
  const bool outliers = threshold > 0;
#if AVX2_CODE
  const bool vector = avx2_f16c() && k % 8 == 0 && rows.scalar_type() == at::kBFloat16;
  const Quantized q = vector ? quantize_avx2(reinterpret_cast<const uint16_t*>(rows.data_ptr()), m, k, limit, outliers)
                             : quantize_plain(rows, limit, outliers);
#else
  const Quantized q = quantize_plain(rows, limit, outliers);
#endif
  const auto scale_of = scales.to(at::kFloat).contiguous();
  const auto bias_of = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* added = bias ? bias_of.data_ptr<float>() : nullptr;
  const Finish f{q.absmax.data(), scale_of.data_ptr<float>(), added, nullptr, nullptr, 0, n};
  auto out = m <= LLM_INT8_FEW_ROWS ? few_rows(q, rows, codes, scales, f) : many_rows(q, rows, codes, scales, f);
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out.view(shape);
}
