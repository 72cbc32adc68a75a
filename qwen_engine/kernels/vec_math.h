// Vectorised exp for the kernels' softmax and SiLU: std::exp costs ~10 ns a value, this ~1 ns for 16 (AVX-512)
// or 8 (AVX2).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

// e^x = 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2; e^r by its Taylor series to r^7 (error below
// 1e-8 relative, under float32's half ulp), 2^n applied exactly by scalef. Inputs are clamped to the range
// where float32 e^x is finite and normal.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33f)), _mm512_set1_ps(88.72f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2, with ln 2 split in two so n · ln2_hi is exact.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
// A 16 x 16 block of floats transposed in registers: r[i] holds row i before, column i after.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a0 b0 a1 b1 / a2 b2 a3 b3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane L: column 4L + j of rows 4i..4i+3
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// The w8a8 mode's int8 products (int8_matmul.cpp): 512 with AVX-512 VNNI, 256 with AVX2, 0 without.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QE_INT8 512
#elif defined(__AVX2__) && defined(__FMA__)
#define QE_INT8 256
#else
#define QE_INT8 0
#endif

#if QE_INT8 == 512
#include <immintrin.h>
// vpdpbusd (acc += u . s, unsigned by signed bytes, four products a lane) with the accumulator updated in place.
// GCC 12 compiles _mm512_dpbusd_epi32 in unrolled tiles with a copy of each accumulator into another register
// before the instruction and back after: 24 register moves per 12 vpdpbusd in int8_matmul.cpp's 4 x 3 tile,
// which cost a third of the a8 mode's gate/up time at 32 rows of x (benchmarks.md, thirty-second pass).
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

inline float hsum4(__m128 v) {  // the sum of 4 lanes
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

inline float hsum8(__m256 v) {  // the sum of 8 lanes
  return hsum4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define QE_VEC8 1
// exp512's method on 8 lanes. Without scalef, 2^n is built in the exponent bits, so the upper clamp is
// 88.37 (n ≤ 127; e^88.37 is within 0.3 % of float32's largest value, far beyond any softmax or SiLU input).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33f)), _mm256_set1_ps(88.37f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#else
#define QE_VEC8 0
#endif

// One float vector of the build's widest kind (QE_LANES floats; 0 without AVX2), so that a kernel whose loops
// only load, multiply, add and reduce is written once for AVX-512 and AVX2. QE_REGS: the vector registers.
#if defined(__AVX512F__)
#define QE_LANES 16
#define QE_REGS 32
using vfloat = __m512;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat vset(float x) { return _mm512_set1_ps(x); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline float vmaxall(vfloat v) { return _mm512_reduce_max_ps(v); }
inline vfloat vexp(vfloat v) { return exp512(v); }
// a in the first `count` lanes (0 ≤ count ≤ QE_LANES), fill in the others.
inline vfloat vfirst(vfloat a, int count, vfloat fill) {
  return _mm512_mask_mov_ps(fill, static_cast<__mmask16>((1u << count) - 1), a);
}
// The four sums of v0..v3's lanes: pairs of vectors are folded together before the lanes are, so four
// reductions cost about a third of four separate ones.
inline __m128 vsum4(vfloat v0, vfloat v1, vfloat v2, vfloat v3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));  // v0 v1 v0 v1 / 128 bits
  const __m512 c = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512 d = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c))));
  const __m256 e = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));  // v0 v1 v2 v3 twice
  return _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
}
#elif QE_VEC8
#define QE_LANES 8
#define QE_REGS 16
using vfloat = __m256;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat vset(float x) { return _mm256_set1_ps(x); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vfloat v) { return hsum8(v); }
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline float vmaxall(vfloat v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
inline vfloat vexp(vfloat v) { return exp256(v); }
inline vfloat vfirst(vfloat a, int count, vfloat fill) {
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_blendv_ps(fill, a, _mm256_castsi256_ps(keep));
}
inline __m128 vsum4(vfloat v0, vfloat v1, vfloat v2, vfloat v3) {
  const __m256 a = _mm256_hadd_ps(v0, v1), c = _mm256_hadd_ps(v2, v3);  // per 128 bits: v0 v0 v1 v1 / v2 v2 v3 v3
  const __m256 d = _mm256_hadd_ps(a, c);                                // per 128 bits: v0 v1 v2 v3
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}
#else
#define QE_LANES 0
#endif

// The largest of n > 0 values (a softmax's shift): the same value std::max_element finds, a vector at a time.
inline float max_value(const float* x, int64_t n) {
  int64_t i = 0;
  float top = x[0];
#if QE_LANES
  if (n >= QE_LANES) {
    vfloat m = vload(x);
    for (i = QE_LANES; i + QE_LANES <= n; i += QE_LANES) m = vmax(m, vload(x + i));
    top = vmaxall(m);
  }
#endif
  for (; i < n; ++i) top = x[i] > top ? x[i] : top;
  return top;
}

// y[i] = exp(x[i] - shift) for n values; returns their sum.
inline float exp_shifted(const float* x, float shift, float* y, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), s));
    _mm512_storeu_ps(y + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + i), s));
    _mm512_mask_storeu_ps(y + i, tail, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(tail, e));
    i = n;
  }
  sum = _mm512_reduce_add_ps(acc);
#elif QE_VEC8
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; i < n; ++i) sum += (y[i] = std::exp(x[i] - shift));
  return sum;
}

// out[i] = silu(g[i]) · u[i] = g / (1 + e^-g) · u for n values (out may be g; u nullptr: silu alone). The division
// is a reciprocal estimate refined by one Newton step (~1 ulp; a vector division costs ~16 cycles and dominated
// this loop).
inline void silu_mul_to(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 d = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, two));  // r (2 - d r)
    const __m512 y = _mm512_mul_ps(x, r);
    _mm512_storeu_ps(out + i, u ? _mm512_mul_ps(y, _mm512_loadu_ps(u + i)) : y);
  }
#elif QE_VEC8
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 y = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    _mm256_storeu_ps(out + i, u ? _mm256_mul_ps(y, _mm256_loadu_ps(u + i)) : y);
  }
#endif
  for (; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * (u ? u[i] : 1.0f);
}

inline void silu_mul(float* g, const float* u, int64_t n) { silu_mul_to(g, u, g, n); }
