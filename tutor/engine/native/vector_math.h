// Float helpers for the native kernels (prefill.cpp, decode_attention.cpp), written without calls
// or branches so that the loops using them vectorize. A function marked VECTOR_CLONES gets a
// copy for AVX-512 and one for AVX2 beside the plain one, chosen by the CPU at load.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

// Hand-written AVX2 code (TARGET_AVX2 functions), run where avx2_fma() says the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2_CODE 1
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define AVX2_CODE 0
#endif

// Compiled into each copy of its caller: a call out of a copy runs the plain, unvectorized code
// (the prompt's attention took 7.1 ms a layer so, against 2.3).
#if defined(__GNUC__)
#define INTO_CALLER inline __attribute__((always_inline))
#else
#define INTO_CALLER inline
#endif

namespace vector_math {

inline bool avx2_fma() {
#if AVX2_CODE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Reductions are kept in this many partial results, so that they vectorize without licence to
// reorder a sum.
constexpr int64_t LANES = 16;

INTO_CALLER float from_bf16(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

// Rounded to nearest even, as torch rounds float to bf16 (no NaN reaches here).
INTO_CALLER uint16_t to_bf16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

#if AVX2_CODE
// 8 bf16 values as floats.
TARGET_AVX2 inline __m256 from_bf16x8(const uint16_t* bits) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Rounded to bf16 (to nearest even, as to_bf16), kept as the float it stands for.
TARGET_AVX2 inline __m256 round_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
  return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

// exp(x) for x <= 0 (below -87, exp(-87)): Cephes' expf (Cody-Waite reduction, a degree-5 polynomial,
// about 1 ulp).
INTO_CALLER float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // round(x / ln 2) by adding and taking away 1.5 * 2^23 (|x / ln 2| < 2^22)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// scores[0..n) in place by their softmax.
INTO_CALLER void softmax(float* scores, int64_t n) {
  const int64_t whole = n - n % LANES;
  float tops[LANES];
  for (int64_t l = 0; l < LANES; ++l) tops[l] = -INFINITY;
  for (int64_t j = 0; j < whole; j += LANES)
    for (int64_t l = 0; l < LANES; ++l) tops[l] = scores[j + l] > tops[l] ? scores[j + l] : tops[l];
  float top = -INFINITY;
  for (int64_t l = 0; l < LANES; ++l) top = std::max(top, tops[l]);
  for (int64_t j = whole; j < n; ++j) top = std::max(top, scores[j]);
  for (int64_t j = 0; j < n; ++j) scores[j] = exp_nonpositive(scores[j] - top);
  float sums[LANES] = {};
  for (int64_t j = 0; j < whole; j += LANES)
    for (int64_t l = 0; l < LANES; ++l) sums[l] += scores[j + l];
  float sum = 0.0f;
  for (int64_t l = 0; l < LANES; ++l) sum += sums[l];
  for (int64_t j = whole; j < n; ++j) sum += scores[j];
  const float inverse = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) scores[j] *= inverse;
}

}  // namespace vector_math
