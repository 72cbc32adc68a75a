// The functions each kernel source offers the others and the Python module (bindings.cpp), by source.
#pragma once

#include <cstdint>
#include <vector>

#include "tensors.h"

// quant_matmul.cpp: products with weights in GGUF blocks
at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& qtypes,
                  const c10::optional<at::Tensor>& bias, int64_t gemv_max_rows);
at::Tensor dequantize(const at::Tensor& weight, int64_t qtype, int64_t K);
at::Tensor dequantize_rows(const at::Tensor& weight, int64_t qtype, int64_t K, const at::Tensor& ids);
at::Tensor q5_0_as_q8_0(const at::Tensor& weight, int64_t K);
at::Tensor q5_0_as_fields(const at::Tensor& weight, int64_t K);
at::Tensor q6_k_as_fields(const at::Tensor& weight, int64_t K);
bool prefers_fields();
bool has_avx512();
bool set_wide_vectors(bool on);
bool amx_prefill_available();
bool set_amx_prefill(bool on);

// paged_attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                            const at::Tensor& lengths, double scale);
bool bf16_decode_products();
void write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_new, const at::Tensor& v_new,
              const at::Tensor& write_slots);
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin);
void causal_softmax_(at::Tensor scores, double scale);

// prefill_attention.cpp
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                             double scale);
bool prefill_attention_supports(int64_t head_dim);

// bf16_ops.cpp
bool bf16_kernels();
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul_bf16(const at::Tensor& gate, const at::Tensor& up);

// segment_attention.cpp
bool segment_attention_supports(int64_t head_dim, bool int8_scores);
at::Tensor segment_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale, bool int8_scores, bool out_float32);

// activations.cpp
bool gelu_tanh_supports(const at::Tensor& x);
at::Tensor gelu_tanh_(at::Tensor x);
at::Tensor silu_mul_(at::Tensor gate, const at::Tensor& up);

// decode_step.cpp (and its DecodeStep class, decode_step.h)
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul_rows(const at::Tensor& gate_up);
at::Tensor argmax_rows(const at::Tensor& x);

// int8_matmul.cpp: the int8 products exist where vec_math.h sets QE_INT8 (VNNI or AVX2); int8_has_amx everywhere
bool int8_has_amx();
bool set_int8_amx_units(bool on);
at::Tensor int8_linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t N, const at::Tensor& weight_scales,
                           const c10::optional<at::Tensor>& bias, int64_t group,
                           const c10::optional<at::Tensor>& factors);
at::Tensor int8_linear_units(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                             const at::Tensor& weight_scales, const c10::optional<at::Tensor>& bias, int64_t group,
                             const c10::optional<at::Tensor>& factors, const c10::optional<at::Tensor>& offsets,
                             int64_t planes, int64_t zero);
std::vector<at::Tensor> int8_quantize_weight(const at::Tensor& w, int64_t group);
std::vector<at::Tensor> int8_quantize(const at::Tensor& x, int64_t group, const c10::optional<at::Tensor>& factors);

// delta_rule.cpp
at::Tensor delta_rule_step_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                            const at::Tensor& beta, at::Tensor state);
at::Tensor deltanet_decode_(const at::Tensor& mixed, const at::Tensor& z, const at::Tensor& b, const at::Tensor& a,
                            const at::Tensor& slots, at::Tensor conv_pool, at::Tensor delta_pool,
                            const at::Tensor& conv_weight, const at::Tensor& a_log, const at::Tensor& dt_bias,
                            const at::Tensor& norm_weight, double eps, int64_t key_heads, bool tiled);
at::Tensor causal_conv_silu_(const at::Tensor& x, at::Tensor state, const at::Tensor& weight);
at::Tensor unit_lower_solve(const at::Tensor& lower, const at::Tensor& b);
