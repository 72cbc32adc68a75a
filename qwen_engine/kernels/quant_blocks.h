// GGUF block formats for the kernels in quant_matmul.cpp (included there only): how each ggml block type lays
// out its values, decoded to float32 either one block at a time (`scalar`) or as 16-lane vectors (`vec`).
//
// Every decoded value is exactly the float32 that gguf.quants.dequantize produces (same operations in the
// same order; the build disables FMA contraction so `d * q - m` is not fused).
// Block layouts follow ggml (ggml-common.h): Q8_0, Q4_0, Q5_0 hold 32 values, Q4_K and Q6_K 256.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QE_AVX512 1
#else
#define QE_AVX512 0
#endif
// AVX2 + FMA + F16C without AVX-512 (e.g. AMD Zen 2/3): 8-lane versions of the same decodes.
#if !QE_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QE_AVX2 1
#else
#define QE_AVX2 0
#endif
#if QE_AVX512 && defined(__AVX512VBMI__)
#define QE_VBMI 1
#else
#define QE_VBMI 0
#endif

namespace {

// ggml type numbers (GGMLQuantizationType).
enum : int64_t { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14, T_BF16 = 30 };
// Block types of our own (not ggml's): exact re-encodings made at load, numbered past ggml's.
enum : int64_t { T_Q5_0_FIELDS = 1006, T_Q6_K_FIELDS = 1007 };

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction; the portable conversion below costs ~15
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if QE_AVX512
inline __m512i bytes16(const uint8_t* p) {  // 16 bytes → 16 int32 lanes
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512 scaled(__m512i q, __m512 d) { return _mm512_mul_ps(_mm512_cvtepi32_ps(q), d); }
// 0, 1, ..., 15 as floats. Types with at most 32 distinct values per scale dequantise through a table: the
// table holds the exact float32 of every possible value, and a lane permute picks them (cheaper than
// convert + multiply per value, and bit-identical since each entry is computed the same way).
inline __m512 iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
#endif

#if QE_AVX512 || QE_AVX2
inline __m256i bytes8(const uint8_t* p) {  // 8 bytes → 8 int32 lanes
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
#endif
#if QE_AVX2
inline __m256 scaled8(__m256i q, __m256 d) { return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d); }
#endif

// Each block type: QK values in BYTES bytes. `scalar` writes the QK floats; `vec` hands them to f(v, w) as
// 16-lane vectors, w holding values [16v, 16v + 16) of the block (AVX2: `vec8`, 8-lane vectors, [8v, 8v + 8)).

struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34;
  static void scalar(const uint8_t* b, float* o) {
    const float d = f16(b);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < 32; ++i) o[i] = static_cast<float>(q[i]) * d;
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(b));
    for (int v = 0; v < 2; ++v)
      f(v, scaled(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * v))), d));
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    const __m256 d = _mm256_set1_ps(f16(b));
    for (int v = 0; v < 4; ++v)
      f(v, scaled8(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * v))), d));
  }
#endif
};

struct Q4_0 {  // value j: low nibble of qs[j] (j < 16) or high nibble of qs[j - 16]; w = d * (q - 8)
  static constexpr int QK = 32, BYTES = 18;
  static void scalar(const uint8_t* b, float* o) {
    const float d = f16(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      o[j] = static_cast<float>((qs[j] & 15) - 8) * d;
      o[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota(), _mm512_set1_ps(8)), _mm512_set1_ps(f16(b)));
    const __m512i q = bytes16(b + 2);
    f(0, _mm512_permutexvar_ps(q, table));  // the permute reads only the low 4 bits of each index
    f(1, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table));
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    const __m256 d = _mm256_set1_ps(f16(b));
    const __m256i fifteen = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    for (int v = 0; v < 2; ++v) {
      const __m256i q = bytes8(b + 2 + 8 * v);
      f(v, scaled8(_mm256_sub_epi32(_mm256_and_si256(q, fifteen), eight), d));
      f(v + 2, scaled8(_mm256_sub_epi32(_mm256_srli_epi32(q, 4), eight), d));
    }
  }
#endif
};

struct Q5_0 {  // as Q4_0 plus a fifth bit per value in qh (bit j for value j); w = d * (q - 16)
  static constexpr int QK = 32, BYTES = 22;
  static void scalar(const uint8_t* b, float* o) {
    const float d = f16(b);
    const uint32_t qh = u32(b + 2);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 15) | (((qh >> j) & 1) << 4);
      const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      o[j] = static_cast<float>(lo - 16) * d;
      o[j + 16] = static_cast<float>(hi - 16) * d;
    }
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    const __m512 d = _mm512_set1_ps(f16(b));
    // Values q - 16 for q < 16 and for q >= 16: the fifth bit (a lane mask from qh) picks the table.
    const __m512 low_table = _mm512_mul_ps(_mm512_sub_ps(iota(), _mm512_set1_ps(16)), d);
    const __m512 high_table = _mm512_mul_ps(iota(), d);
    const uint32_t qh = u32(b + 2);
    const __m512i q = bytes16(b + 6), hi = _mm512_srli_epi32(q, 4);
    const __mmask16 lo_bits = static_cast<__mmask16>(qh & 0xFFFF), hi_bits = static_cast<__mmask16>(qh >> 16);
    f(0, _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q, low_table), lo_bits, q, high_table));
    f(1, _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(hi, low_table), hi_bits, hi, high_table));
  }
#endif
#if QE_AVX2
  // Lane j of vector v takes the fifth bit of value 8v + j from qh shifted right by 8v + j.
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    const __m256 d = _mm256_set1_ps(f16(b));
    const __m256i qh = _mm256_set1_epi32(static_cast<int>(u32(b + 2)));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one = _mm256_set1_epi32(1);
    const __m256i fifteen = _mm256_set1_epi32(15), sixteen = _mm256_set1_epi32(16);
    for (int v = 0; v < 2; ++v) {
      const __m256i q = bytes8(b + 6 + 8 * v);
      const __m256i bit_lo = _mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * v))), one);
      const __m256i bit_hi =
          _mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_add_epi32(lane, _mm256_set1_epi32(16 + 8 * v))), one);
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, fifteen), _mm256_slli_epi32(bit_lo, 4));
      const __m256i hi = _mm256_or_si256(_mm256_srli_epi32(q, 4), _mm256_slli_epi32(bit_hi, 4));
      f(v, scaled8(_mm256_sub_epi32(lo, sixteen), d));
      f(v + 2, scaled8(_mm256_sub_epi32(hi, sixteen), d));
    }
  }
#endif
};

// Q5_0 re-laid at load for 8-lane products (q5_0_as_fields in quant_matmul.cpp; not a ggml type). Four Q5_0
// blocks (128 values) in 104 bytes: three groups of 32 bytes, each 8 little-endian uint32 lanes, then the four
// blocks' f16 scales. Values 8v .. 8v + 7 (v = 0..15) are the lanes' bits [shift(v), shift(v) + 5) in group
// v / 6 (six 5-bit fields a lane; the last group holds four), each Q5_0's unsigned q; w = d[v / 4] * (q - 16).
// One AND per 8 values isolates a field, scaled by 2^shift(v), which the products take off through x (the
// GEMVs read x scaled by 2^-shift: the same products, rounded the same). 0.81 bytes a value against Q8_0's 1.06,
// with the same three operations per 8 values as Q8_0's widening load.
struct Q5F {
  static constexpr int QK = 128, BYTES = 104;
  static constexpr int group(int v) { return v / 6; }
  static constexpr int shift(int v) { return 5 * (v % 6); }
  static void scalar(const uint8_t* b, float* o) {
    for (int i = 0; i < 128; ++i) {
      const int v = i / 8, q = static_cast<int>((u32(b + 32 * group(v) + 4 * (i % 8)) >> shift(v)) & 31);
      o[i] = static_cast<float>(q - 16) * f16(b + 96 + 2 * (i / 32));
    }
  }
#if QE_AVX512 || QE_AVX2
  static inline __m256i q8(const uint8_t* b, int v) {  // q - 16 of values 8v .. 8v + 7
    const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * group(v)));
    return _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(lanes, shift(v)), _mm256_set1_epi32(31)),
                            _mm256_set1_epi32(16));
  }
#endif
#if QE_AVX512
  // 16 values (two 8-value fields of one Q5_0 block) at a time, through a table of d (q - 16) for q = 0..31 in two
  // vectors: a field shifted down is the permute's index, whose low 5 bits alone it reads (as iota() notes,
  // each entry is computed as scalar() computes it). 1.1x the speed of the 9-64-row products that a shift, mask,
  // subtract, convert and multiply per 8 values gave (gate+up, 16-32 rows).
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    __m512 below[4], above[4];  // per Q5_0 block: q = 0..15, then 16..31
    for (int j = 0; j < 4; ++j) {
      const __m512 d = _mm512_set1_ps(f16(b + 96 + 2 * j));
      below[j] = _mm512_mul_ps(_mm512_sub_ps(iota(), _mm512_set1_ps(16.0f)), d);
      above[j] = _mm512_mul_ps(iota(), d);
    }
#pragma GCC unroll 3
    for (int g = 0; g < 3; ++g) {  // lane group g holds fields 6g .. 6g + 5
      const __m512i lanes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * g)));
#pragma GCC unroll 3
      for (int v = 3 * g; v < (g < 2 ? 3 * g + 3 : 8); ++v) {
        const __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi32(shift(2 * v)), _mm256_set1_epi32(shift(2 * v + 1)), 1);
        f(v, _mm512_permutex2var_ps(below[v / 2], _mm512_srlv_epi32(lanes, shifts), above[v / 2]));
      }
    }
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
#pragma GCC unroll 16
    for (int v = 0; v < 16; ++v) f(v, scaled8(q8(b, v), _mm256_set1_ps(f16(b + 96 + 2 * (v / 4)))));
  }
#endif
};

struct Q4_K {  // d, dmin, 12 bytes of packed 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of nibbles
  static constexpr int QK = 256, BYTES = 144;
  // Sub-block j's scale and min, unpacked from the 12 bytes as ggml packs them.
  static void scales(const uint8_t* b, float* ds, float* dm) {
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* s = b + 4;
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
      } else {
        sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      }
      ds[j] = d * static_cast<float>(sc);
      dm[j] = dmin * static_cast<float>(m);
    }
  }
  // Bytes 32g..32g+31 of qs hold sub-block 2g in their low nibbles and 2g + 1 in their high nibbles.
  static void scalar(const uint8_t* b, float* o) {
    float ds[8], dm[8];
    scales(b, ds, dm);
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 8; ++j)
      for (int l = 0; l < 32; ++l) {
        const int q = (qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 15;
        o[32 * j + l] = ds[j] * static_cast<float>(q) - dm[j];
      }
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    float ds[8], dm[8];
    scales(b, ds, dm);
    __m512 tables[8];  // ds[j] * q - dm[j] for q = 0..15
    for (int j = 0; j < 8; ++j)
      tables[j] = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ds[j]), iota()), _mm512_set1_ps(dm[j]));
    const uint8_t* qs = b + 16;
    for (int g = 0; g < 4; ++g)
      for (int half = 0; half < 2; ++half) {
        const __m512i q = bytes16(qs + 32 * g + 16 * half);
        f(4 * g + half, _mm512_permutexvar_ps(q, tables[2 * g]));
        f(4 * g + 2 + half, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), tables[2 * g + 1]));
      }
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    float ds[8], dm[8];
    scales(b, ds, dm);
    const __m256i fifteen = _mm256_set1_epi32(15);
    const uint8_t* qs = b + 16;
    for (int g = 0; g < 4; ++g)
      for (int part = 0; part < 4; ++part) {
        const __m256i q = bytes8(qs + 32 * g + 8 * part);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, fifteen)), hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
        f(8 * g + part, _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(ds[2 * g]), lo), _mm256_set1_ps(dm[2 * g])));
        f(8 * g + 4 + part,
          _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(ds[2 * g + 1]), hi), _mm256_set1_ps(dm[2 * g + 1])));
      }
  }
#endif
};

struct Q6_K {  // ql[128] low nibbles, qh[64] 2-bit pairs, 16 int8 scales, d; w = (d * scale) * (q - 32)
  static constexpr int QK = 256, BYTES = 210;
  // Value e = 128h + 32t + l takes its low 4 bits from ql[64h + 32(t & 1) + l] (low nibble for t < 2, high for
  // t >= 2) and its top 2 bits from qh[32h + l] >> 2t.
  static void scalar(const uint8_t* b, float* o) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, t = (e % 128) / 32, l = e % 32;
      const int lowbyte = ql[64 * h + 32 * (t & 1) + l];
      const int low = t < 2 ? (lowbyte & 15) : (lowbyte >> 4);
      const int high = (qh[32 * h + l] >> (2 * t)) & 3;
      o[e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>((low | (high << 4)) - 32);
    }
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    const __m512i fifteen = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {
        const __m512i high_bits = bytes16(qh + 32 * h + 16 * half);
        const __m512i low0 = bytes16(ql + 64 * h + 16 * half), low1 = bytes16(ql + 64 * h + 32 + 16 * half);
        for (int t = 0; t < 4; ++t) {
          const __m512i lowbytes = (t & 1) ? low1 : low0;
          const __m512i low = t < 2 ? _mm512_and_si512(lowbytes, fifteen) : _mm512_srli_epi32(lowbytes, 4);
          const __m512i high = _mm512_and_si512(_mm512_srlv_epi32(high_bits, _mm512_set1_epi32(2 * t)), three);
          const __m512i q = _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32(high, 4)), bias);
          const int v = 8 * h + 2 * t + half;
          f(v, scaled(q, _mm512_set1_ps(d * static_cast<float>(sc[v]))));
        }
      }
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    const __m256i fifteen = _mm256_set1_epi32(15), three = _mm256_set1_epi32(3), bias = _mm256_set1_epi32(32);
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 4; ++c) {  // values l = 8c .. 8c + 7 of each 32
        const __m256i high_bits = bytes8(qh + 32 * h + 8 * c);
        const __m256i low0 = bytes8(ql + 64 * h + 8 * c), low1 = bytes8(ql + 64 * h + 32 + 8 * c);
        for (int t = 0; t < 4; ++t) {
          const __m256i lowbytes = (t & 1) ? low1 : low0;
          const __m256i low = t < 2 ? _mm256_and_si256(lowbytes, fifteen) : _mm256_srli_epi32(lowbytes, 4);
          const __m256i high = _mm256_and_si256(_mm256_srlv_epi32(high_bits, _mm256_set1_epi32(2 * t)), three);
          const __m256i q = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)), bias);
          f(16 * h + 4 * t + c, scaled8(q, _mm256_set1_ps(d * static_cast<float>(sc[8 * h + 2 * t + c / 2]))));
        }
      }
  }
#endif
};

// Q6_K re-laid at load for 8-lane products (q6_k_as_fields in quant_matmul.cpp; not a ggml type), the same 210
// bytes a block: six groups of 32 bytes, each 8 little-endian uint32 lanes, then Q6_K's 16 int8 scales and f16
// d. Values 8v .. 8v + 7 (v = 0..29) are the lanes' bits [shift(v), shift(v) + 6) in group v / 5 (five 6-bit
// fields a lane, as Q5F: one AND isolates q 2^shift, and x comes scaled by 2^-shift). The two bits left at the
// top of every lane hold the last 16 values: value 240 + i has its bits 2p, 2p + 1 in bits 30, 31 of lane i of
// group p, value 248 + i in group 3 + p. w = d * sc[v / 2] * (q - 32), as Q6_K. Q6_K's own layout needs ~4
// byte operations and a widening per 16 values before the convert; the one-row product ran 1.45x faster.
struct Q6F {
  static constexpr int QK = 256, BYTES = 210;
  static constexpr int group(int v) { return v / 5; }
  static constexpr int shift(int v) { return v < 30 ? 6 * (v % 5) : 0; }
  static int q(const uint8_t* b, int e) {  // value e's unsigned q (0..63)
    const int v = e / 8, i = e % 8;
    if (v < 30) return static_cast<int>((u32(b + 32 * group(v) + 4 * i) >> shift(v)) & 63);
    int q = 0;
    for (int p = 0; p < 3; ++p) q |= static_cast<int>(u32(b + 32 * (3 * (v - 30) + p) + 4 * i) >> 30) << (2 * p);
    return q;
  }
  static void scalar(const uint8_t* b, float* o) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    for (int e = 0; e < 256; ++e) o[e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>(q(b, e) - 32);
  }
#if QE_AVX512 || QE_AVX2
  // q 2^shift(v) of values 8v .. 8v + 7 (v < 30), or q of the last 16 values (v = 30, 31), as int32 lanes.
  static inline __m256i field(const __m256i (&g)[6], int v) {
    if (v < 30) return _mm256_and_si256(g[group(v)], _mm256_set1_epi32(63 << shift(v)));
    const int p = 3 * (v - 30);
    const __m256i b0 = _mm256_srli_epi32(g[p], 30), b1 = _mm256_srli_epi32(g[p + 1], 28), b2 = _mm256_srli_epi32(g[p + 2], 26);
    return _mm256_or_si256(b0, _mm256_or_si256(_mm256_and_si256(b1, _mm256_set1_epi32(12)),
                                               _mm256_and_si256(b2, _mm256_set1_epi32(48))));
  }
  static inline void load(const uint8_t* b, __m256i (&g)[6]) {
    for (int i = 0; i < 6; ++i) g[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * i));
  }
  static inline __m256i q8(const __m256i (&g)[6], int v) {  // q - 32 of values 8v .. 8v + 7
    return _mm256_sub_epi32(_mm256_srli_epi32(field(g, v), shift(v)), _mm256_set1_epi32(32));
  }
#endif
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    __m256i g[6];
    load(b, g);
#pragma GCC unroll 16
    for (int v = 0; v < 16; ++v) {
      const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(q8(g, 2 * v)), q8(g, 2 * v + 1), 1);
      f(v, scaled(q, _mm512_set1_ps(d * static_cast<float>(sc[v]))));
    }
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    __m256i g[6];
    load(b, g);
#pragma GCC unroll 32
    for (int v = 0; v < 32; ++v) f(v, scaled8(q8(g, v), _mm256_set1_ps(d * static_cast<float>(sc[v / 2]))));
  }
#endif
};

struct F32 {  // plain float32 rows (a float model's weights viewed as bytes), so one decode path serves both
  static constexpr int QK = 16, BYTES = 64;
  static void scalar(const uint8_t* b, float* o) { std::memcpy(o, b, 64); }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    f(0, _mm512_loadu_ps(reinterpret_cast<const float*>(b)));
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    f(0, _mm256_loadu_ps(reinterpret_cast<const float*>(b)));
    f(1, _mm256_loadu_ps(reinterpret_cast<const float*>(b) + 8));
  }
#endif
};

struct F16 {
  static constexpr int QK = 16, BYTES = 32;
  static void scalar(const uint8_t* b, float* o) {
    for (int i = 0; i < 16; ++i) o[i] = f16(b + 2 * i);
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    f(0, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))));
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    f(0, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
    f(1, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16))));
  }
#endif
};

struct BF16 {  // the top 16 bits of a float32
  static constexpr int QK = 16, BYTES = 32;
  static void scalar(const uint8_t* b, float* o) {
    for (int i = 0; i < 16; ++i) {
      const uint32_t bits = static_cast<uint32_t>(b[2 * i] | (b[2 * i + 1] << 8)) << 16;
      std::memcpy(o + i, &bits, 4);
    }
  }
#if QE_AVX512
  template <class F>
  static inline void vec(const uint8_t* b, F&& f) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    f(0, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
  }
#endif
#if QE_AVX2
  template <class F>
  static inline void vec8(const uint8_t* b, F&& f) {
    for (int v = 0; v < 2; ++v) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * v)));
      f(v, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
  }
#endif
};

// One row of W (K values) into out.
template <class B>
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  for (int64_t b = 0; b < K / B::QK; ++b) {
#if QE_AVX512
    float* o = out + b * B::QK;
    B::vec(row + b * B::BYTES, [o](int v, __m512 w) { _mm512_storeu_ps(o + 16 * v, w); });
#elif QE_AVX2
    float* o = out + b * B::QK;
    B::vec8(row + b * B::BYTES, [o](int v, __m256 w) { _mm256_storeu_ps(o + 8 * v, w); });
#else
    B::scalar(row + b * B::BYTES, out + b * B::QK);
#endif
  }
}

#if QE_AVX512
// Blocks of 32 values with one f16 scale d at byte 0 (Q8_0, Q5_0) have a faster decode path: `q` gives the
// unscaled values (as exact small integers in float32) and the scale is applied once per block to a partial
// sum (M = 1) or to the 32 values (M > 1). The rounding differs from dequantise-then-multiply, not the maths.
template <class B>
struct Unscaled : std::false_type {};
template <>
struct Unscaled<Q8_0> : std::true_type {
  static constexpr bool PERMUTED = false;
  static inline void q(const uint8_t* b, __m512& lo, __m512& hi) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
  }
};
template <>
struct Unscaled<Q5_0> : std::true_type {
  // One two-table permute per 16 values: index bits 0-3 are the nibble, bit 4 the value's qh bit, rotated into
  // place lane by lane (bits above 4 are ignored by the permute). Tables: q - 16 for q = 0..15 and 16..31.
#if QE_VBMI
  // Lane j holds values b(j) and 16 + b(j) of the block (so x is permuted to match, see permute_x): a 128-bit
  // broadcast of the 16 nibble bytes puts bytes 0-7 in the even qwords and 8-15 in the odd ones, and one
  // multishift copies byte b(j) to bits 0-7 of dword j and its high nibble to bits 16-19. qh rotated by
  // 4 - b(j) brings bits b(j) and 16 + b(j) to bits 4 and 20, so one select gives both indices.
  static constexpr bool PERMUTED = true;
  static int lane_value(int j) { return ((j / 2) % 2) * 8 + (j / 4) * 2 + (j % 2); }
  static inline void q(const uint8_t* b, __m512& lo, __m512& hi) {
    const __m512 t_lo = _mm512_setr_ps(-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512 t_hi = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // multishift control: dword j = the bytes at bit offsets p, p, p + 4, p of its qword, p = 8 (b(j) % 8).
    const __m512i ctrl = _mm512_setr_epi32(0x00040000, 0x080c0808, 0x00040000, 0x080c0808, 0x10141010, 0x181c1818,
                                           0x10141010, 0x181c1818, 0x20242020, 0x282c2828, 0x20242020, 0x282c2828,
                                           0x30343030, 0x383c3838, 0x30343030, 0x383c3838);
    const __m512i rot = _mm512_setr_epi32(4, 3, 28, 27, 2, 1, 26, 25, 0, 31, 24, 23, 30, 29, 22, 21);
    const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
    const __m512i qh = _mm512_set1_epi32(static_cast<int>(u32(b + 2)));
    const __m512i qs = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6)));
    // ternary logic 0xD8: third ? second : first, bit by bit (nibbles from the bytes, the rest from qh).
    const __m512i idx = _mm512_ternarylogic_epi32(_mm512_rolv_epi32(qh, rot), _mm512_multishift_epi64_epi8(ctrl, qs),
                                                  nibbles, 0xD8);
    lo = _mm512_permutex2var_ps(t_lo, idx, t_hi);
    hi = _mm512_permutex2var_ps(t_lo, _mm512_srli_epi32(idx, 16), t_hi);
  }
#else
  static constexpr bool PERMUTED = false;
  static inline void q(const uint8_t* b, __m512& lo, __m512& hi) {
    const __m512 t_lo = _mm512_setr_ps(-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512 t_hi = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // Lane j: bit j of qh (value j) and bit 16 + j (value 16 + j) rotated to bit 4.
    const __m512i rot_lo = _mm512_setr_epi32(4, 3, 2, 1, 0, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21);
    const __m512i rot_hi = _mm512_setr_epi32(20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5);
    const __m512i fifteen = _mm512_set1_epi32(15);
    const __m512i qh = _mm512_set1_epi32(static_cast<int>(u32(b + 2)));
    const __m512i q = bytes16(b + 6);
    // ternary logic 0xD8: third ? second : first, bit by bit (low 4 bits from the nibble, the rest from qh).
    const __m512i i_lo = _mm512_ternarylogic_epi32(_mm512_rolv_epi32(qh, rot_lo), q, fifteen, 0xD8);
    const __m512i i_hi = _mm512_ternarylogic_epi32(_mm512_rolv_epi32(qh, rot_hi), _mm512_srli_epi32(q, 4), fifteen, 0xD8);
    lo = _mm512_permutex2var_ps(t_lo, i_lo, t_hi);
    hi = _mm512_permutex2var_ps(t_lo, i_hi, t_hi);
  }
#endif
};

#endif

}  // namespace
