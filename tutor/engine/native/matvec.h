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

// x (rows, k) int8 codes times int8 codes (n, k) transposed: (rows, n) int32, exact.
at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& weight);

// LLM.int8's linear (tutor.engine.linears.LlmInt8Linear) for rows int8_matvec reads: the same
// arithmetic as that slot's Python, rounded as its ATen operations round (the elementwise steps
// as loops of their own, the outlier columns by the same ATen operations), so its output is
// bitsandbytes' Linear8bitLt's bit for bit, without a call back into Python for each of a
// token's 120 slots.
// ``codes`` (n, k) int8 and ``scales`` (n) float32 are the module's CB and SCB.
at::Tensor llm_int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, double threshold);
