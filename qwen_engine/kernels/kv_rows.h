// The KV pool's element types: float32 (exact), or float16 / bfloat16 (the lossy kv_cache_dtype option: half
// the bytes a step reads at long contexts). The attention kernels are written once on a type KV and read a
// pool row as floats through these, so products, sums and softmax stay float32 (except decode attention's bf16
// products on a bfloat16 pool, paged_attention.cpp's attend_chunk_bf16).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "vec_math.h"

// A stored value as float32 (the scalar tails; also the rotary of bfloat16 vision rows).
inline float kv_float(float x) { return x; }
inline float kv_float(c10::Half x) { return static_cast<float>(x); }
inline float kv_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Hints that the `bytes` from p will be read soon, one cache line at a time, into L2.
inline void prefetch_lines(const void* p, int bytes) {
  for (int b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T1);
}

#if QE_LANES
// QE_LANES values of a pool row as a float vector (float16: vcvtph2ps; bfloat16: the 16 bits moved up, exact).
inline vfloat vload(const c10::Half* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float f[QE_LANES];
  for (int i = 0; i < QE_LANES; ++i) f[i] = static_cast<float>(p[i]);
  return vload(f);
#endif
}
inline vfloat vload(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
#endif
}
#endif

// Calls f(KV{}) with the element type of a pool tensor (float32, float16 or bfloat16).
template <class F>
auto with_kv_type(const at::Tensor& pool, F&& f) {
  switch (pool.scalar_type()) {
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return f(float{});
  }
}

inline bool kv_type_supported(const at::Tensor& pool) {
  return pool.scalar_type() == at::kFloat || pool.scalar_type() == at::kHalf || pool.scalar_type() == at::kBFloat16;
}
