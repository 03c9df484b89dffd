// Few-row products (a decode step's rows) for CPUs without a bf16 matmul of their own, where
// oneDNN emulates bf16 and bitsandbytes' CPU kernels are missing (its 4-bit one is AVX-512 BF16,
// its int8 one AVX-512): a bf16 weight, a bitsandbytes NF4/FP4 one or LLM.int8's codes, read
// once per call. On a 2-core AVX2 EPYC an nf4 decode step had spent 129 ms a token in
// bitsandbytes' fallback, which dequantizes the whole weight at every call, and LLM.int8 its
// time in float32 copies of its codes made at every call. The 4-bit kernel multiplies in 14-bit
// fixed point (FIXED_ONE): looking up 32 codes' float32 values took 13 vector shuffles, 64
// codes' 16-bit values take 4, and a token's 4-bit weights went from 10.2-12.1 ms to 6.6-8.6
// there; finding each span's absmax by a shift, not a loop over blocks, brought the median to
// 7.0 from 8.2 ms (calls alternated in one process).
// Each call is named to the profiler (quant_tutor::matvec_*), so that `quant-tutor bench
// --profile` counts it as a matmul.
#include "matvec.h"

#include "vector_math.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t ROWS_AT_ONCE = 4;  // input rows sharing one read of the weight
constexpr int64_t GRAIN = 32;        // outputs per thread at least
constexpr int64_t SPAN = 16;         // the AVX2 kernels' step along k

constexpr int64_t NIBBLE_SPAN = 64;  // the 4-bit kernel's: 32 bytes of codes (a 64-block's)

// Where a span of the input goes in the AVX2 kernels' order. bf16: unpacking 16 weights into two
// vectors of floats takes weights 0-3 and 8-11 into the first, 4-7 and 12-15 into the second.
// 4-bit: byte i of 32 holds weights 2i (high nibble) and 2i+1 (low). The low nibbles are looked
// up in one vector and the high ones in another, each with the first 16 bytes in its first half;
// interleaving the two bytes of their 16-bit values takes the first eight of each half into one
// vector, the last eight into the next.
constexpr int BF16_ORDER[SPAN] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
constexpr int NIBBLE_ORDER[NIBBLE_SPAN] = {
    1, 3, 5, 7, 9, 11, 13, 15, 33, 35, 37, 39, 41, 43, 45, 47,
    17, 19, 21, 23, 25, 27, 29, 31, 49, 51, 53, 55, 57, 59, 61, 63,
    0, 2, 4, 6, 8, 10, 12, 14, 32, 34, 36, 38, 40, 42, 44, 46,
    16, 18, 20, 22, 24, 26, 28, 30, 48, 50, 52, 54, 56, 58, 60, 62};

// The 4-bit kernel multiplies 14-bit fixed-point numbers: the code table's values (all within
// [-1, 1]) times 2^14 - 1, and each span of an input row scaled so that its largest magnitude is
// that too, each rounded to nearest (relative to the span's largest, 3e-5 at most, where bf16
// rounds at 4e-3). The eight products that meet in an int32 lane still fit it (8 * 16383^2 <
// 2^31).
constexpr float FIXED_ONE = 16383.0f;

bool avx2(int64_t k) { return vector_math::avx2_fma() && k % SPAN == 0; }

// The input rows in float32, each SPAN of them in ``order`` (none: as they are).
std::vector<float> arranged(const at::Tensor& x, const int* order) {
  const int64_t size = x.numel();
  std::vector<float> out(static_cast<size_t>(size));
  auto place = [&](auto&& value_at) {
    for (int64_t at = 0; at < size; at += SPAN) {
      for (int64_t i = 0; i < SPAN && at + i < size; ++i) {
        out[at + i] = value_at(order ? at + order[i] : at + i);
      }
    }
  };
  if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
    const auto* bits = reinterpret_cast<const uint16_t*>(x.data_ptr());
    place([&](int64_t at) { return vector_math::from_bf16(bits[at]); });
  } else {
    const auto flat = x.to(at::kFloat).contiguous();
    const float* from = flat.data_ptr<float>();
    place([&](int64_t at) { return from[at]; });
  }
  return out;
}

// The input rows as 14-bit integers in NIBBLE_ORDER, and per NIBBLE_SPAN of a row the float
// that turns them back (the span's largest magnitude / FIXED_ONE); empty where a value is not
// finite.
struct FixedPoint {
  std::vector<int16_t> values;
  std::vector<float> scales;
};

FixedPoint fixed_point(const std::vector<float>& xs) {
  const int64_t spans = static_cast<int64_t>(xs.size()) / NIBBLE_SPAN;
  FixedPoint out{std::vector<int16_t>(xs.size()), std::vector<float>(static_cast<size_t>(spans))};
  for (int64_t s = 0; s < spans; ++s) {
    const float* from = xs.data() + s * NIBBLE_SPAN;
    float largest = 0.0f;
    for (int64_t i = 0; i < NIBBLE_SPAN; ++i) {
      largest = std::max(largest, std::fabs(from[i]));
    }
    if (!std::isfinite(largest)) {
      return {};
    }
    const float to_fixed = largest > 0.0f ? FIXED_ONE / largest : 0.0f;
    for (int64_t i = 0; i < NIBBLE_SPAN; ++i) {
      out.values[s * NIBBLE_SPAN + i] = static_cast<int16_t>(std::nearbyint(from[NIBBLE_ORDER[i]] * to_fixed));
    }
    out.scales[s] = largest / (FIXED_ONE * FIXED_ONE);  // the table's 2^14 - 1 with it
  }
  return out;
}

// Calls ``kernel(first, R)``, R a std::integral_constant, for each run of at most ROWS_AT_ONCE
// rows from row ``first``.
template <typename Kernel>
void in_runs(int64_t rows, Kernel&& kernel) {
  for (int64_t first = 0; first < rows; first += ROWS_AT_ONCE) {
    switch (std::min(rows - first, ROWS_AT_ONCE)) {
      case 1: kernel(first, std::integral_constant<int, 1>{}); break;
      case 2: kernel(first, std::integral_constant<int, 2>{}); break;
      case 3: kernel(first, std::integral_constant<int, 3>{}); break;
      default: kernel(first, std::integral_constant<int, 4>{}); break;
    }
  }
}

// Rows this far ahead of the one being read are asked for from memory (the prefetchers alone
// kept reads of a token's bf16 weights at 6.8 GB/s on a 2-core AVX2 EPYC that sums them at
// 8.5 GB/s; fetched ahead: 8.0).
constexpr int64_t AHEAD = 4;
constexpr int64_t LINE = 64;  // bytes in a cache line

#if AVX2_CODE
TARGET_AVX2 inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Outputs [begin, end) of R rows, ``xs`` in BF16_ORDER.
template <int R>
TARGET_AVX2 void bf16_avx2(const float* xs, int64_t k, const uint16_t* weight, int64_t n, int64_t begin,
                           int64_t end, float* sums) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = begin; j < end; ++j) {
    const uint16_t* row = weight + j * k;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < k; i += SPAN) {
      if (i % (LINE / 2) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(row + AHEAD * k + i), _MM_HINT_T0);
      }
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
      const __m256 low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
      const __m256 high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(low, _mm256_loadu_ps(xs + r * k + i), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(high, _mm256_loadu_ps(xs + r * k + i + 8), acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      sums[r * n + j] = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
  }
}

// One span of 64 codes (32 bytes) against R rows' fixed-point inputs at ``xs`` (row r at
// xs + r * k), each span's integer sums scaled by ``scale`` (the block's absmax) times the input
// span's own (``xscales``, row r at xscales + r * spans) into ``acc``. ``planes``: the code
// table's 16-bit fixed-point values as two 16-byte tables (low bytes, high bytes), each in both
// halves of a vector; four byte shuffles look up all 64 codes.
template <int R>
TARGET_AVX2 inline void nibble_span(const uint8_t* code_bytes, const int16_t* xs, int64_t k, const float* xscales,
                                    int64_t spans, float scale, __m256i low_plane, __m256i high_plane,
                                    __m256* acc) {
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code_bytes));
  const __m256i odd = _mm256_and_si256(bytes, nibble), even = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
  const __m256i odd_low = _mm256_shuffle_epi8(low_plane, odd), odd_high = _mm256_shuffle_epi8(high_plane, odd);
  const __m256i even_low = _mm256_shuffle_epi8(low_plane, even), even_high = _mm256_shuffle_epi8(high_plane, even);
  const __m256i w0 = _mm256_unpacklo_epi8(odd_low, odd_high), w1 = _mm256_unpackhi_epi8(odd_low, odd_high);
  const __m256i w2 = _mm256_unpacklo_epi8(even_low, even_high), w3 = _mm256_unpackhi_epi8(even_low, even_high);
  for (int r = 0; r < R; ++r) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xs + r * k);
    const __m256i dot = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(x)), _mm256_madd_epi16(w1, _mm256_loadu_si256(x + 1))),
        _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_loadu_si256(x + 2)), _mm256_madd_epi16(w3, _mm256_loadu_si256(x + 3))));
    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale * xscales[r * spans]), _mm256_cvtepi32_ps(dot), acc[r]);
  }
}

// Outputs [begin, end) of R rows, ``xs``/``xscales`` their fixed_point(), ``absmax`` one scale
// per block of 2^``block_shift`` spans, found by a shift: a loop over blocks, each holding one
// span, had cost as many instructions as the arithmetic.
template <int R>
TARGET_AVX2 void four_bit_avx2(const int16_t* xs, const float* xscales, int64_t k, const uint8_t* codes,
                               const float* absmax, const __m256i* planes, int block_shift, int64_t n,
                               int64_t begin, int64_t end, float* sums) {
  const int64_t spans = k / NIBBLE_SPAN, row_bytes = k / 2;
  const __m256i low_plane = planes[0], high_plane = planes[1];
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* row = codes + j * row_bytes;
    const float* scales = absmax + ((j * spans) >> block_shift);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_ps();
    }
    for (int64_t s = 0; s < spans; ++s) {
      const uint8_t* span_codes = row + s * (NIBBLE_SPAN / 2);
      if (s % 2 == 0) {  // a cache line holds two spans' codes
        _mm_prefetch(reinterpret_cast<const char*>(span_codes + AHEAD * row_bytes), _MM_HINT_T0);
      }
      nibble_span<R>(span_codes, xs + s * NIBBLE_SPAN, k, xscales + s, spans, scales[s >> block_shift], low_plane,
                     high_plane, acc);
    }
    for (int r = 0; r < R; ++r) {
      sums[r * n + j] = sum8(acc[r]);
    }
  }
}

// Outputs [begin, end) of R rows of int8 codes times int8 codes, ``xs`` the rows' codes widened
// to int16: exact int32 sums.
template <int R>
TARGET_AVX2 void int8_avx2(const int16_t* xs, int64_t k, const int8_t* weight, int64_t n, int64_t begin,
                           int64_t end, int32_t* sums) {
  for (int64_t j = begin; j < end; ++j) {
    const int8_t* row = weight + j * k;
    __m256i acc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_setzero_si256();
    }
    for (int64_t i = 0; i < k; i += SPAN) {
      if (i % LINE == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(row + AHEAD * k + i), _MM_HINT_T0);
      }
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + r * k + i));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w, x));
      }
    }
    for (int r = 0; r < R; ++r) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      sums[r * n + j] = _mm_cvtsi128_si32(s);
    }
  }
}
#endif

// The same sums in plain code (another CPU, or k not a multiple of SPAN); ``weight_at(j, i)``
// is weight (j, i) as a Sum.
template <typename In, typename Sum, typename Weight>
void plain(const In* xs, int64_t rows, int64_t k, int64_t n, int64_t begin, int64_t end, Sum* sums,
           Weight&& weight_at) {
  for (int64_t j = begin; j < end; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      Sum sum = 0;
      for (int64_t i = 0; i < k; ++i) {
        sum += weight_at(j, i) * xs[r * k + i];
      }
      sums[r * n + j] = sum;
    }
  }
}

// (rows, n) bf16 from float32 sums, the bias (if any) added before rounding.
at::Tensor finished(const std::vector<float>& sums, int64_t rows, int64_t n, const at::Tensor& like,
                    const std::optional<at::Tensor>& bias) {
  auto out = at::empty({rows, n}, like.options().dtype(at::kBFloat16));
  auto* bits = reinterpret_cast<uint16_t*>(out.data_ptr());
  std::optional<at::Tensor> b;
  if (bias) {
    b = bias->to(at::kFloat).contiguous();
  }
  const float* add = b ? b->data_ptr<float>() : nullptr;
  for (int64_t at = 0; at < rows * n; ++at) {
    bits[at] = vector_math::to_bf16(add ? sums[at] + add[at % n] : sums[at]);
  }
  return out;
}

void check_input(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "a matvec's input is (rows, ", k, "), not ", x.sizes());
}

}  // namespace

at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  RECORD_FUNCTION("quant_tutor::matvec_bf16", std::vector<c10::IValue>());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "bf16_matvec wants a contiguous (n, k) bf16 weight");
  const int64_t rows = x.size(0), k = weight.size(1), n = weight.size(0);
  check_input(x, k);
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const bool fast = avx2(k);
  const auto xs = arranged(x, fast ? BF16_ORDER : nullptr);
  std::vector<float> sums(static_cast<size_t>(rows * n));
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
#if AVX2_CODE
    if (fast) {
      in_runs(rows, [&](int64_t first, auto run) {
        bf16_avx2<decltype(run)::value>(xs.data() + first * k, k, w, n, begin, end, sums.data() + first * n);
      });
      return;
    }
#endif
    plain(xs.data(), rows, k, n, begin, end, sums.data(),
          [&](int64_t j, int64_t i) { return vector_math::from_bf16(w[j * k + i]); });
  });
  return finished(sums, rows, n, x, bias);
}

void int8_sums(const int16_t* xs, int64_t rows, int64_t k, const int8_t* w, int64_t n, int32_t* sums) {
  RECORD_FUNCTION("quant_tutor::matvec_int8", std::vector<c10::IValue>());
  const bool fast = avx2(k);
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
#if AVX2_CODE
    if (fast) {
      in_runs(rows, [&](int64_t first, auto run) {
        int8_avx2<decltype(run)::value>(xs + first * k, k, w, n, begin, end, sums + first * n);
      });
      return;
    }
#endif
    plain(xs, rows, k, n, begin, end, sums,
          [&](int64_t j, int64_t i) { return static_cast<int32_t>(w[j * k + i]); });
  });
}

at::Tensor four_bit_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                           const at::Tensor& table, int64_t n, int64_t blocksize,
                           const std::optional<at::Tensor>& bias) {
  RECORD_FUNCTION("quant_tutor::matvec_4bit", std::vector<c10::IValue>());
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(x.dim() == 2 && k % blocksize == 0 && blocksize % 32 == 0, "4-bit rows of ", k,
              " in blocks of ", blocksize);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() * 2 == n * k,
              "4-bit codes: ", codes.numel(), " bytes for ", n, "x", k);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() * blocksize == n * k,
              "4-bit absmax: ", absmax.numel(), " scales for ", n, "x", k, " in blocks of ", blocksize);
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == 16,
              "a 4-bit code table has 16 floats");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* scales = absmax.data_ptr<float>();
  const float* values = table.data_ptr<float>();
  const auto xs = arranged(x, nullptr);
  // In fixed point where the AVX2 kernel can be used (blocks of a power of two of whole spans:
  // bitsandbytes' 4-bit blocksizes, 64 to 4096) and its integer sums cannot overflow: the table
  // within [-1, 1] (NF4's and FP4's are) and every input finite. Else in float32.
  const bool table_fits = std::all_of(values, values + 16, [](float v) { return std::fabs(v) <= 1.0f; });
  const int64_t spans_a_block = blocksize / NIBBLE_SPAN;
  const bool whole_spans = blocksize % NIBBLE_SPAN == 0 && (spans_a_block & (spans_a_block - 1)) == 0;
  const int block_shift = whole_spans ? __builtin_ctzll(static_cast<unsigned long long>(spans_a_block)) : 0;
  const FixedPoint fixed = avx2(k) && whole_spans && table_fits ? fixed_point(xs) : FixedPoint{};
  const bool fast = !fixed.values.empty();
  std::vector<float> sums(static_cast<size_t>(rows * n));
#if AVX2_CODE
  uint8_t plane_bytes[2][32];
  for (int code = 0; code < 16; ++code) {
    const auto value = static_cast<int16_t>(std::nearbyint(values[code] * FIXED_ONE));
    for (int p = 0; p < 2; ++p) {
      plane_bytes[p][code] = plane_bytes[p][code + 16] = static_cast<uint8_t>(static_cast<uint16_t>(value) >> (8 * p));
    }
  }
  __m256i planes[2];
  std::memcpy(planes, plane_bytes, sizeof(planes));
#endif
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
#if AVX2_CODE
    if (fast) {
      const int64_t spans = k / NIBBLE_SPAN;
      in_runs(rows, [&](int64_t first, auto run) {
        four_bit_avx2<decltype(run)::value>(fixed.values.data() + first * k, fixed.scales.data() + first * spans, k,
                                            c, scales, planes, block_shift, n, begin, end, sums.data() + first * n);
      });
      return;
    }
#endif
    plain(xs.data(), rows, k, n, begin, end, sums.data(), [&](int64_t j, int64_t i) {
      const int64_t at = j * k + i;
      const uint8_t byte = c[at / 2];
      return values[at % 2 ? byte & 15 : byte >> 4] * scales[at / blocksize];
    });
  });
  return finished(sums, rows, n, x, bias);
}
