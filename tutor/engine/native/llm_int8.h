// LLM.int8's linear where bitsandbytes only emulates its int8 matmul (native/llm_int8.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

// The rows up to which llm_int8_linear reads the weight once for all rows (a decode step's);
// more rows (a prompt's) go through its GEMM (``avx2_int8_gemm``).
constexpr int64_t LLM_INT8_FEW_ROWS = 8;

// LLM.int8's linear (tutor.engine.linears.LlmInt8Linear), the arithmetic of bitsandbytes'
// Linear8bitLt: each row's absmax of the input's fp16 copy without its outliers, the codes, the
// integer product, its dequantization, and the outlier columns' product in 16-bit added back.
// ``codes`` (n, k) int8 and ``scales`` (n) float32 are the module's CB and SCB. Up to
// LLM_INT8_FEW_ROWS rows its output is the module's bit for bit (the outlier columns through the
// same ATen operations), so that the decode step calls it for each of a token's 120 slots
// without a call back into Python. More rows want bf16 and AVX2 (``avx2_int8_gemm``): their
// outlier columns are summed in float32 in another order than ATen's addmm, so an output may be
// one bf16 step from the module's.
at::Tensor llm_int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, double threshold);

// Whether llm_int8_linear takes many rows for an (n, k) weight here: AVX2 (with F16C), k a
// multiple of 16 and n of 8.
bool avx2_int8_gemm(int64_t k, int64_t n);
