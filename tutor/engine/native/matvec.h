// Few-row products for CPUs without a bf16 matmul of their own (native/matvec.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

// x (rows, k) times a bf16 weight (n, k) transposed, plus a bf16 bias of n if given: (rows, n)
// bf16, the sums in float32.
at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// x (rows, k) times a bitsandbytes 4-bit weight (n, k) transposed, plus a bias as above: (rows,
// n) bf16. ``codes`` are its bytes (two codes each, the first in the high nibble), ``absmax``
// its float32 scale per ``blocksize`` weights (a multiple of 32), ``table`` the 16 float32
// values a code stands for (NF4 or FP4). Each weight is table[code] * absmax, bitsandbytes'
// float32 dequantization. With AVX2 and blocks of 64 times a power of two, the table and each 64
// inputs are rounded to 14-bit fixed point (relative to their largest magnitude, within 3e-5 of
// it) and summed exactly in int32, each span's sum scaled in float32; else the sums are float32.
at::Tensor four_bit_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                           const at::Tensor& table, int64_t n, int64_t blocksize,
                           const std::optional<at::Tensor>& bias);

// ``rows`` rows of int8 codes widened to int16 (rows, k) times int8 codes (n, k) transposed, into
// ``sums`` (rows, n): exact int32 sums.
void int8_sums(const int16_t* xs, int64_t rows, int64_t k, const int8_t* weight, int64_t n, int32_t* sums);
