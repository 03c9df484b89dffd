// A decode step's attention over the KV cache (decode_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

// q (rows, heads, 1, dim), k and v (rows, kv_heads, end, dim), all bf16 with `dim` contiguous
// (the cache's views as they are); `mask` (rows, 1, 1, end) true where a row may look, or none.
// Each query head reads the KV head transformers' repeat_kv pairs it with. (rows, heads, 1, dim).
// decode_attention reads the cache as bf16 in place; one_query_attention is the decoder's choice
// between it and float32 ATen ops (tutor.engine.attention.one_query_attention's own, where no
// extension is loaded), which the native step and the Python loop both call.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale);
at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale);
