// A decoder layer's elementwise parts for bf16 rows on a CPU, each one loop (native/layer_math.cpp).
#pragma once

#include <ATen/ATen.h>

// RMSNorm as transformers computes it: x (..., hidden) normalised in float32, rounded to bf16,
// then times ``weight`` (hidden), rounded again.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);

// silu(gate) * up for (rows, n) gate and up, each rounded to bf16 as ATen's two ops round.
at::Tensor silu_mul_bf16(const at::Tensor& gate, const at::Tensor& up);

// One new position per row: ``qkv`` (rows, (heads + 2 kv_heads) * dim), its queries and keys
// rotated by ``cos`` and ``sin`` (dim each) as the decoder's ATen ops rotate them (x * cos +
// roll(x, dim / 2) * sin, each product and the sum rounded to bf16), the keys and values written
// into ``layer_cache`` (2, rows, kv_heads, max_len, dim) at ``position``. Returns the queries,
// (rows, heads, 1, dim).
at::Tensor rotate_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& layer_cache, int64_t position, int64_t heads, int64_t kv_heads,
                             int64_t dim);
