// y = x @ W^T with W stored in GGUF blocks and x in float32: the weights are dequantised inside the kernel.
//
// Every dequantised value is exactly the float32 that gguf.quants.dequantize produces (same operations in the
// same order; the build disables FMA contraction so `d * q - m` is not fused). Only the order of the dot
// product's sums differs from a float32 matmul over the dequantised matrix.
//
// Two paths:
//   * few rows of x (decode): a fused GEMV; each weight block is dequantised into registers and multiplied
//     with up to 8 rows of x at once, output rows split across threads.
//   * many rows (prefill): the weight is dequantised tile by tile into a reused float32 scratch buffer and
//     handed to torch's matmul (MKL/oneDNN), so no float32 copy of the model is ever kept.
//
// Block layouts follow ggml (ggml-common.h): Q8_0, Q4_0, Q5_0 hold 32 values, Q4_K and Q6_K 256.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QE_AVX512 1
#else
#define QE_AVX512 0
#endif

namespace {

// ggml type numbers (GGMLQuantizationType).
enum : int64_t { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14, T_BF16 = 30 };

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

// Each block type: QK values in BYTES bytes. `scalar` writes the QK floats; `vec` hands them to f(v, w) as
// 16-lane vectors, w holding values [16v, 16v + 16) of the block.

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
};

// One row of W (K values) into out.
template <class B>
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  for (int64_t b = 0; b < K / B::QK; ++b) {
#if QE_AVX512
    float* o = out + b * B::QK;
    B::vec(row + b * B::BYTES, [o](int v, __m512 w) { _mm512_storeu_ps(o + 16 * v, w); });
#else
    B::scalar(row + b * B::BYTES, out + b * B::QK);
#endif
  }
}

// y[m, n] = x[m, :] · W[n, :] (+ bias[n]) for M rows of x and weight rows [n0, n1).
#if QE_AVX512
template <class B, int M>
void gemv_rows(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
               const float* bias, int64_t n0, int64_t n1) {
  const int64_t nb = K / B::QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * row_bytes;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * B::QK;
      B::vec(row + b * B::BYTES, [&](int v, __m512 w) {
        for (int m = 0; m < M; ++m)
          acc[m][v & 1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + m * ldx + 16 * v), acc[m][v & 1]);
      });
    }
    const float add = bias ? bias[n] : 0.0f;
    for (int m = 0; m < M; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + add;
  }
}
#else
template <class B, int M>
void gemv_rows(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
               const float* bias, int64_t n0, int64_t n1) {
  std::vector<float> w(K);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row<B>(W + n * row_bytes, K, w.data());
    for (int m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * w[k];
      y[m * ldy + n] = s + (bias ? bias[n] : 0.0f);
    }
  }
}
#endif

#if QE_AVX512
// y[0..MR, 0..NR] of one tile: MR rows of x against NR dequantised weight rows, all K-long, with MR x NR vector
// accumulators (each x and w vector loaded once per 16 values serves NR or MR FMAs).
template <int MR, int NR>
void dot_tile(const float* x, int64_t K, const float* w, float* y, int64_t ldy, const float* bias) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * K + k);
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv[i], wv[j], acc[i][j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, const float*);
constexpr TileFn TILES[4][4] = {
    {dot_tile<1, 1>, dot_tile<1, 2>, dot_tile<1, 3>, dot_tile<1, 4>},
    {dot_tile<2, 1>, dot_tile<2, 2>, dot_tile<2, 3>, dot_tile<2, 4>},
    {dot_tile<3, 1>, dot_tile<3, 2>, dot_tile<3, 3>, dot_tile<3, 4>},
    {dot_tile<4, 1>, dot_tile<4, 2>, dot_tile<4, 3>, dot_tile<4, 4>},
};

// Several rows of x (a batch of decodes): each group of 4 weight rows is dequantised once into a small buffer
// that stays in cache, then multiplied with x 4 rows at a time.
template <class B>
void gemm_small(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* y, int64_t ldy,
                const float* bias, int64_t n0, int64_t n1) {
  constexpr bool plain = std::is_same<B, F32>::value;  // float32 rows are multiplied where they lie
  std::vector<float> buf(plain ? 0 : 4 * K);
  for (int64_t n = n0; n < n1; n += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, n1 - n));
    const float* w = plain ? reinterpret_cast<const float*>(W + n * row_bytes) : buf.data();
    if (!plain)
      for (int r = 0; r < nr; ++r) dequant_row<B>(W + (n + r) * row_bytes, K, buf.data() + r * K);
    for (int64_t m = 0; m < M; m += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - m));
      TILES[mr - 1][nr - 1](x + m * K, K, w, y + m * ldy + n, ldy, bias ? bias + n : nullptr);
    }
  }
}
#else
template <class B>
void gemm_small(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* y, int64_t ldy,
                const float* bias, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) gemv_rows<B, 1>(W, row_bytes, K, x + m * K, K, y + m * ldy, ldy, bias, n0, n1);
}
#endif

// Up to 3 rows of x: dequantise in registers (the weights are read once and never stored); more rows: tiles.
template <class B>
void gemv(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* y, int64_t ldy,
          const float* bias, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: gemv_rows<B, 1>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 2: gemv_rows<B, 2>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 3: gemv_rows<B, 3>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    default: gemm_small<B>(W, row_bytes, K, x, M, y, ldy, bias, n0, n1);
  }
}

// A weight made of segments (e.g. q, k, v stacked), each with its own block type; rows are numbered across them.
struct Segment {
  const uint8_t* data;
  int64_t qtype, rows, row_bytes, first;  // first: index of its row 0 in the stacked output
};

int block_values(int64_t qtype) {
  switch (qtype) {
    case T_Q8_0: case T_Q4_0: case T_Q5_0: return 32;
    case T_Q4_K: case T_Q6_K: return 256;
    case T_F32: case T_F16: case T_BF16: return 16;
    default: return 0;
  }
}

int block_bytes(int64_t qtype) {
  switch (qtype) {
    case T_Q8_0: return Q8_0::BYTES;
    case T_Q4_0: return Q4_0::BYTES;
    case T_Q5_0: return Q5_0::BYTES;
    case T_Q4_K: return Q4_K::BYTES;
    case T_Q6_K: return Q6_K::BYTES;
    case T_F32: return F32::BYTES;
    case T_F16: return F16::BYTES;
    case T_BF16: return BF16::BYTES;
    default: return 0;
  }
}

template <class Fn>
void with_block_type(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case T_Q8_0: fn(Q8_0{}); break;
    case T_Q4_0: fn(Q4_0{}); break;
    case T_Q5_0: fn(Q5_0{}); break;
    case T_Q4_K: fn(Q4_K{}); break;
    case T_Q6_K: fn(Q6_K{}); break;
    case T_F32: fn(F32{}); break;
    case T_F16: fn(F16{}); break;
    case T_BF16: fn(BF16{}); break;
    default: TORCH_CHECK(false, "no kernel for GGUF type ", qtype);
  }
}

std::vector<Segment> segments_of(const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& qtypes,
                                 int64_t K) {
  TORCH_CHECK(!weights.empty() && weights.size() == qtypes.size(), "need one block type per weight segment");
  std::vector<Segment> segs;
  int64_t first = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t qk = block_values(qtypes[i]);
    TORCH_CHECK(qk > 0, "no kernel for GGUF type ", qtypes[i]);
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
                "weights must be contiguous CPU uint8 [rows, bytes per row]");
    TORCH_CHECK(K % qk == 0, "K = ", K, " is not a multiple of the block size ", qk);
    TORCH_CHECK(w.size(1) == K / qk * block_bytes(qtypes[i]), "weight rows have ", w.size(1),
                " bytes, expected ", K / qk * block_bytes(qtypes[i]), " for K = ", K);
    segs.push_back({w.data_ptr<uint8_t>(), qtypes[i], w.size(0), w.size(1), first});
    first += w.size(0);
  }
  return segs;
}

// Calls fn(segment, local row begin, local row end) for the parts of stacked rows [r0, r1) in each segment.
template <class Fn>
void for_segments(const std::vector<Segment>& segs, int64_t r0, int64_t r1, Fn&& fn) {
  for (const auto& s : segs) {
    const int64_t a = std::max(r0, s.first), b = std::min(r1, s.first + s.rows);
    if (a < b) fn(s, a - s.first, b - s.first);
  }
}

// Dequantised stacked rows [r0, r1) into out (row-major, K floats each), in parallel.
void dequant_rows_into(const std::vector<Segment>& segs, int64_t K, int64_t r0, int64_t r1, float* out) {
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    for_segments(segs, a, b, [&](const Segment& s, int64_t lo, int64_t hi) {
      with_block_type(s.qtype, [&](auto blk) {
        using B = decltype(blk);
        for (int64_t r = lo; r < hi; ++r) dequant_row<B>(s.data + r * s.row_bytes, K, out + (s.first + r - r0) * K);
      });
    });
  });
}

// The prefill path's float32 tile, kept between calls so its pages are faulted in once.
std::mutex scratch_mutex;
torch::Tensor scratch;
constexpr int64_t SCRATCH_FLOATS = int64_t(8) << 20;  // 32 MiB: a whole gate+up projection of a 0.5B model

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                     const std::vector<int64_t>& qtypes, const c10::optional<torch::Tensor>& bias,
                     int64_t gemv_max_rows) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.device().is_cpu(), "x must be CPU float32 [M, K]");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const auto segs = segments_of(weights, qtypes, K);
  const int64_t N = segs.back().first + segs.back().rows;
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "bias must be contiguous float32 with one value per output row");
    bias_ptr = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= gemv_max_rows) {
    // Grain: enough rows per task that a thread streams a long stretch of the weights.
    at::parallel_for(0, N, 32, [&](int64_t r0, int64_t r1) {
      for_segments(segs, r0, r1, [&](const Segment& s, int64_t lo, int64_t hi) {
        with_block_type(s.qtype, [&](auto blk) {
          gemv<decltype(blk)>(s.data, s.row_bytes, K, xp, M, yp + s.first, N, bias_ptr ? bias_ptr + s.first : nullptr,
                              lo, hi);
        });
      });
    });
    return y;
  }
  std::lock_guard<std::mutex> lock(scratch_mutex);
  // Equal tiles (a last sliver would be a poor GEMM); each product writes its columns of y in place (BLAS takes
  // the row stride), so no tile is copied.
  const int64_t tiles = (N * K + SCRATCH_FLOATS - 1) / SCRATCH_FLOATS;
  const int64_t tile = (N + tiles - 1) / tiles;
  if (!scratch.defined() || scratch.numel() < tile * K) scratch = torch::empty({tile * K}, xc.options());
  for (int64_t r0 = 0; r0 < N; r0 += tile) {
    const int64_t r1 = std::min(N, r0 + tile);
    dequant_rows_into(segs, K, r0, r1, scratch.data_ptr<float>());
    const auto w = scratch.narrow(0, 0, (r1 - r0) * K).view({r1 - r0, K});
    auto out = y.narrow(1, r0, r1 - r0);
    at::mm_out(out, xc, w.t());
  }
  if (bias_ptr) y.add_(*bias);
  return y;
}

torch::Tensor dequantize(const torch::Tensor& weight, int64_t qtype, int64_t K) {
  const auto segs = segments_of({weight}, {qtype}, K);
  auto out = torch::empty({weight.size(0), K}, torch::dtype(torch::kFloat32));
  dequant_rows_into(segs, K, 0, weight.size(0), out.data_ptr<float>());
  return out;
}

torch::Tensor dequantize_rows(const torch::Tensor& weight, int64_t qtype, int64_t K, const torch::Tensor& ids) {
  const auto segs = segments_of({weight}, {qtype}, K);
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.dim() == 1, "ids must be int64 [n]");
  const auto idc = ids.contiguous();
  const int64_t n = idc.size(0), rows = weight.size(0);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < rows, "row ", id[i], " out of range 0..", rows - 1);
  auto out = torch::empty({n, K}, torch::dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  const Segment& s = segs[0];
  with_block_type(qtype, [&](auto blk) {
    for (int64_t i = 0; i < n; ++i) dequant_row<decltype(blk)>(s.data + id[i] * s.row_bytes, K, o + i * K);
  });
  return out;
}

bool has_avx512() { return QE_AVX512; }

// paged_attention.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& slots, const torch::Tensor& lengths, double scale);
void write_kv(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_new, const torch::Tensor& v_new,
              const torch::Tensor& write_slots);
void rotary_(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin);
// decode_step.cpp
void register_decode_step(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ W^T (+ bias) with W in GGUF blocks, stacked from segments");
  m.def("dequantize", &dequantize, "a GGUF weight [rows, bytes] as float32 [rows, K]");
  m.def("dequantize_rows", &dequantize_rows, "selected rows of a GGUF weight as float32");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 kernels were compiled in");
  m.def("decode_attention", &decode_attention, "one query token per sequence against its paged K/V slots");
  m.def("write_kv", &write_kv, "store new key/value rows at their slots of the pool");
  m.def("rotary_", &rotary_, "rotate q or k in place by per-token cos/sin tables");
  register_decode_step(m);
}
