// A decode step's attention over the bf16 KV cache (decode_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

// Up to this many cached positions: beyond it the float32 ATen ops, which use both cores, are
// as fast (a layer of SmolLM2, an AVX-512 EPYC: 11 µs against 29 over 113 positions, 33 against
// 42 over 350, 65 against 64 over 700).
constexpr int64_t DECODE_ATTENTION_MOST = 640;

// q (rows, heads, 1, dim), k and v (rows, kv_heads, end, dim), all bf16 with `dim` contiguous
// (the cache's views as they are); `mask` (rows, 1, 1, end) true where a row may look, or none.
// Each query head reads the KV head transformers' repeat_kv pairs it with. (rows, heads, 1, dim).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale);
