// y = x @ W^T with W stored in GGUF blocks and x in float32: the weights are dequantised inside the kernel.
//
// dequantize()/dequantize_rows() give exactly the float32 that gguf.quants.dequantize produces (same operations
// in the same order; the build disables FMA contraction so `d * q - m` is not fused). The products differ from
// a float32 matmul over the dequantised matrix only in rounding: the order of the sums, and block or sub-block
// scales applied to partial sums (d * sum(q x), and for Q4_K/Q6_K/Q6F at one row of x and Q5_0_FIELDS (Q5F,
// AVX2) at up to 8 the minimum/offset terms computed from per-call sums of x) rather than to each value.
//
// Paths, by the number of rows of x (M):
//   * M <= 8 (decode): a fused GEMV; each weight block is decoded in registers and multiplied with the M rows
//     of x. Q8_0 and Q5_0 decode to unscaled integers (Q5_0 with one two-table permute per 16 values, in a
//     permuted lane order that x is permuted to once per call); M = 1 takes two weight rows at a time; Q4_K
//     and Q6_K at M = 1 factor their scales out of the inner loop (AVX-512 Q4_K, also at M = 2: x in its
//     nibbles' lane order, q4k_lanes_x). The weights are prefetched into L2 16 KiB ahead. K-quants with 2-8
//     rows (AVX-512: 3-8) decode each 8 values once for all rows, on 8-lane vectors.
//     Q5F (1-8 rows) and Q6F (1 row, 7-8 rows): 8-lane fields, x read scaled per field (fields_x); Q6F at 2-8
//     rows decodes each 8 values once for all rows, as the K-quants. Where 6-8 rows of x outgrow L1, K is
//     taken in chunks (in_chunks: K-quants, Q6F from 7 rows, Q8_0/Q5_0 from 6).
//   * 9 <= M <= 64 (many sequences decoding together): weight rows dequantised chunk by chunk into an L1
//     buffer, each value broadcast against 16 rows of x at once from a transposed copy of x. On AVX-512 a
//     few rows past a group of 16 go to the GEMVs above instead (row_pieces).
//   * more rows (prefill): the weight is dequantised tile by tile into a reused float32 scratch buffer and
//     handed to torch's matmul (MKL/oneDNN), so no float32 copy of the model is ever kept.
//   * from 32 rows (48 with Q4_K), on a CPU with AMX tiles and weights of types it reads (Q8_0, Q5_0, Q4_0,
//     Q4_K): bfloat16 tile products as exact as float32 instead (amx_linear.cpp), ahead of both paths above.
//
// Block layouts and their decoding: quant_blocks.h.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "amx_linear.h"
#include "kernels.h"
#include "quant_blocks.h"
#include "vec_math.h"

namespace {

#if QE_AVX512 || QE_AVX2
// Q4_K's 8 sub-block scales d * sc[j] and minimums dmin * m[j], unpacked 4 at a time from the 12 packed bytes
// (the same fields as Q4_K::scales).
inline void q4k_scales(const uint8_t* b, __m256& ds, __m256& dm) {
  uint64_t a;
  std::memcpy(&a, b + 4, 8);
  const uint32_t c = u32(b + 12), a_lo = static_cast<uint32_t>(a), a_hi = static_cast<uint32_t>(a >> 32);
  const uint32_t sc_lo = a_lo & 0x3F3F3F3F, m_lo = a_hi & 0x3F3F3F3F;
  const uint32_t sc_hi = (c & 0x0F0F0F0F) | (((a_lo >> 6) & 0x03030303) << 4);
  const uint32_t m_hi = ((c >> 4) & 0x0F0F0F0F) | (((a_hi >> 6) & 0x03030303) << 4);
  const __m128i v = _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(m_lo),
                                   static_cast<int>(m_hi));
  ds = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_set1_ps(f16(b)));
  dm = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), _mm256_set1_ps(f16(b + 2)));
}
#endif

// The most rows of x the GEMV paths take (their buffers and register tiles are sized for it).
constexpr int64_t GEMV_ROWS_MAX = 64;
// Rows of x a vector of the transposed x (gemm_xt) holds: Mp, its row length, is a multiple of this.
constexpr int64_t XT_LANES = QE_AVX512 ? 16 : 8;

// y[m, n] = x[m, :] · W[n, :] (+ bias[n]) for M rows of x and weight rows [n0, n1).
#if QE_AVX512 || QE_AVX2
// The GEMVs prefetch the weights this many bytes ahead of the current block, into L2: they stream from a
// page-cache mmap, and the hardware prefetchers stop at each 4 KiB page (measured on the demo model's decode
// step: 16 KiB into L2 beat 1.5-8 KiB and prefetching into L1).
constexpr int PREFETCH = 16384;
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
// Every cache line of a block of B, PREFETCH bytes ahead.
template <class B>
inline void prefetch_block(const uint8_t* blk) {
  for (int off = 0; off < B::BYTES; off += 64) prefetch(blk + PREFETCH + off);
}

// y[m, n] = the sum of row m's A vector sums (+ bias[n]), for the M rows of x of a GEMV.
template <int M, int A>
inline void store_sums(const __m256 (&acc)[M][A], float* y, int64_t ldy, const float* bias, int64_t n) {
  const float add = bias ? bias[n] : 0.0f;
  for (int m = 0; m < M; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
    y[m * ldy + n] = hsum8(s) + add;
  }
}
#endif

#if QE_AVX512

// Whether the unscaled decode of B hands out a block's values in a permuted lane order (then x must be too).
template <class B>
constexpr bool permuted() {
  if constexpr (Unscaled<B>::value) return Unscaled<B>::PERMUTED;
  return false;
}

// x [M, K] in the lane order of Q5_0's decode: out[32b + j] = x[32b + b(j)], out[32b + 16 + j] = x[32b + 16 + b(j)].
#if QE_VBMI
void permute_x(const float* x, int64_t n, float* out) {
  alignas(64) int32_t order[16];
  for (int j = 0; j < 16; ++j) order[j] = Unscaled<Q5_0>::lane_value(j);
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x + i)));
}
#endif

// The block's f16 scale (byte 0) broadcast to 16 lanes.
inline __m512 block_scale(const uint8_t* b) { return _mm512_set1_ps(f16(b)); }

// One row of x against two weight rows n, n + 1, for the types with an unscaled decode: per block, the two
// rows' values times x summed into a partial vector, then scaled by d into the row's sum (3 float ops / block).
template <class B>
void gemv1_unscaled_pair(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, float* y,
                         const float* bias, int64_t n) {
  const int64_t nb = K / B::QK;
  const uint8_t* r0 = W + n * row_bytes;
  const uint8_t* r1 = r0 + row_bytes;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* b0 = r0 + b * B::BYTES;
    const uint8_t* b1 = r1 + b * B::BYTES;
    prefetch(b0 + PREFETCH);
    prefetch(b1 + PREFETCH);
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    __m512 lo0, hi0, lo1, hi1;
    Unscaled<B>::q(b0, lo0, hi0);
    Unscaled<B>::q(b1, lo1, hi1);
    const __m512 p0 = _mm512_fmadd_ps(hi0, x1, _mm512_mul_ps(lo0, x0));
    const __m512 p1 = _mm512_fmadd_ps(hi1, x1, _mm512_mul_ps(lo1, x0));
    acc0 = _mm512_fmadd_ps(p0, block_scale(b0), acc0);
    acc1 = _mm512_fmadd_ps(p1, block_scale(b1), acc1);
  }
  y[n] = _mm512_reduce_add_ps(acc0) + (bias ? bias[n] : 0.0f);
  y[n + 1] = _mm512_reduce_add_ps(acc1) + (bias ? bias[n + 1] : 0.0f);
}

// Sum of every 32 values of x (K / 32 floats): the part of a Q4_K product that its sub-block minimums scale.
void sums32(const float* x, int64_t K, float* out) {
  for (int64_t b = 0; b < K / 32; ++b)
    out[b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + 32 * b), _mm512_loadu_ps(x + 32 * b + 16)));
}

// Q4_K at one row of x reads 64 bytes of nibbles at a time as 16 int32 lanes, each lane 8 nibbles: vector (h, n)
// holds nibble n of every lane of bytes 64h..64h+63 of a block's qs, so lanes 0-7 hold sub-block 4h + n % 2 and
// lanes 8-15 sub-block 4h + 2 + n % 2, value 4 * (lane % 8) + n / 2 of it. x is put in that order once per call
// (q4k_lanes_x); a nibble becomes a float by a shift and a permute. The kernel before widened 16 bytes at a time
// and permuted both nibbles of each: this one, two weight rows a pass, runs 1.18-1.4x faster in L2
// (benchmarks/gemv_q4k.py); one-stream decode steps of Q4_K files 1.1-1.2x (docs/benchmarks.md, thirty-ninth pass).
int16_t q4k_lane_source(int i) {  // the value of a 256-block that position i of the lane order holds
  const int h = i / 128, n = (i / 16) % 8, lane = i % 16;
  return static_cast<int16_t>(32 * (2 * (2 * h + lane / 8) + n % 2) + 4 * (lane % 8) + n / 2);
}

void q4k_lanes_x(const float* x, int64_t K, float* out) {
  static const auto order = [] {
    std::array<int16_t, 256> o{};
    for (int i = 0; i < 256; ++i) o[i] = q4k_lane_source(i);
    return o;
  }();
  for (int64_t b = 0; b < K; b += 256)
    for (int i = 0; i < 256; ++i) out[b + i] = x[b + order[i]];
}

// M rows of x (xl: each in the lane order above, ldx apart) against Q4_K weight rows n..n+R-1, scales factored
// out: sum_j ds[j] (q . x)_j - sum_j dm[j] xs[j], xs the 32-value sums of each row of x (ldx / 32 apart). Two
// weight rows at a time (one row of x) share x's loads and interleave two rows' chains of sums; two rows of x
// (one weight row) share each decoded vector, which at M = 2 the generic decode did not (2.1x one row's time).
// (noinline: inlined into gemv<Q4_K>, the one-row form compiled to a loop 0.85x as fast as the same function
// compiled alone)
template <int R, int M>
__attribute__((noinline)) void gemv1_q4k(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xl,
                                         int64_t ldx, const float* xs, float* y, int64_t ldy, const float* bias,
                                         int64_t n) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Per (h, parity): the sub-block scales of lanes 0-7 and 8-15, picked from the block's 8
  const __m512i pick[4] = {
      _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
      _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
      _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
      _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7)};
  __m512 acc[R][M][4];
  __m256 accm[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      for (int a = 0; a < 4; ++a) acc[r][m][a] = _mm512_setzero_ps();
      accm[r][m] = _mm256_setzero_ps();
    }
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk[R];
    __m512 ds16[R];
    for (int r = 0; r < R; ++r) {
      blk[r] = W + (n + r) * row_bytes + b * Q4_K::BYTES;
      prefetch_block<Q4_K>(blk[r]);
      __m256 ds, dm;
      q4k_scales(blk[r], ds, dm);
      for (int m = 0; m < M; ++m)
        accm[r][m] = _mm256_fmadd_ps(dm, _mm256_loadu_ps(xs + m * (ldx / 32) + 8 * b), accm[r][m]);
      ds16[r] = _mm512_castps256_ps512(ds);
    }
    // (unrolled in full: with acc's index 2h not a constant, two weight rows' sums went to the stack)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const float* xh = xl + 256 * b + 128 * h;
      __m512i w[R];
      __m512 even[R][M], odd[R][M];
      for (int r = 0; r < R; ++r) {
        w[r] = _mm512_loadu_si512(blk[r] + 16 + 64 * h);
        // kept in a register: the compiler folded the load into each of the 7 shifts below (8 loads of the same
        // 64 bytes), and on Zen 4 one-row Q4_K products ran 1.07-1.12x faster without (forty-first pass)
        __asm__("" : "+v"(w[r]));
      }
      // nibble k of each lane as a float: the permute reads only an index's low 4 bits
      auto value = [&](int r, int k) {
        return _mm512_permutexvar_ps(k == 0 ? w[r] : _mm512_srli_epi32(w[r], 4 * k), iota);
      };
#pragma GCC unroll 4
      for (int k = 0; k < 8; k += 2) {
        __m512 x0[M], x1[M];
        for (int m = 0; m < M; ++m)
          x0[m] = _mm512_loadu_ps(xh + m * ldx + 16 * k), x1[m] = _mm512_loadu_ps(xh + m * ldx + 16 * k + 16);
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < M; ++m) {
            const __m512 v0 = value(r, k), v1 = value(r, k + 1);  // (the same for every m: computed once)
            even[r][m] = k == 0 ? _mm512_mul_ps(v0, x0[m]) : _mm512_fmadd_ps(v0, x0[m], even[r][m]);
            odd[r][m] = k == 0 ? _mm512_mul_ps(v1, x1[m]) : _mm512_fmadd_ps(v1, x1[m], odd[r][m]);
          }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
          const __m512 se = _mm512_permutexvar_ps(pick[2 * h], ds16[r]);
          const __m512 so = _mm512_permutexvar_ps(pick[2 * h + 1], ds16[r]);
          acc[r][m][2 * h] = _mm512_fmadd_ps(even[r][m], se, acc[r][m][2 * h]);
          acc[r][m][2 * h + 1] = _mm512_fmadd_ps(odd[r][m], so, acc[r][m][2 * h + 1]);
        }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const __m512 sum =
          _mm512_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]), _mm512_add_ps(acc[r][m][2], acc[r][m][3]));
      y[m * ldy + n + r] = _mm512_reduce_add_ps(sum) - hsum8(accm[r][m]) + (bias ? bias[n + r] : 0.0f);
    }
}

// Sum of every 16 values of x (K / 16 floats): the part of a Q6_K product that its offset -32 scales.
void sums16(const float* x, int64_t K, float* out) {
  for (int64_t b = 0; b < K / 16; ++b) out[b] = _mm512_reduce_add_ps(_mm512_loadu_ps(x + 16 * b));
}

// One row of x against Q6_K weight row n, scales and offset factored out: sum_v s[v] ((q . x)_v - 32 xs[v]) over
// the 16-value groups v, s[v] = d * sc[v]. The 6-bit values are assembled 16 at a time on bytes (128-bit ops,
// which have three ports), then widened and converted once.
void gemv1_q6k(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, const float* xs, float* y,
               const float* bias, int64_t n) {
  const uint8_t* row = W + n * row_bytes;
  const __m128i low4 = _mm_set1_epi8(0x0F), high2 = _mm_set1_epi8(0x30);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), accm = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * Q6_K::BYTES;
    prefetch_block<Q6_K>(blk);
    const uint8_t *ql = blk, *qh = blk + 128;
    const __m512 s = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)))),
        _mm512_set1_ps(f16(blk + 208)));
    accm = _mm512_fmadd_ps(s, _mm512_loadu_ps(xs + 16 * b), accm);
    alignas(64) float sa[16];
    _mm512_store_ps(sa, s);
    const float* xb = x + 256 * b;
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {
        const __m128i H = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 32 * h + 16 * half));
        const __m128i L0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ql + 64 * h + 16 * half));
        const __m128i L1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ql + 64 * h + 32 + 16 * half));
        for (int t = 0; t < 4; ++t) {
          const __m128i Lb = (t & 1) ? L1 : L0;
          const __m128i low = _mm_and_si128(t < 2 ? Lb : _mm_srli_epi16(Lb, 4), low4);
          const __m128i hs = t == 0 ? _mm_slli_epi16(H, 4) : t == 1 ? _mm_slli_epi16(H, 2) : t == 2 ? H : _mm_srli_epi16(H, 2);
          const __m128i q = _mm_or_si128(low, _mm_and_si128(hs, high2));
          const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), _mm512_set1_ps(sa[8 * h + 2 * t + half]));
          const __m512 xv = _mm512_loadu_ps(xb + 128 * h + 32 * t + 16 * half);
          if (half == 0)
            acc0 = _mm512_fmadd_ps(w, xv, acc0);
          else
            acc1 = _mm512_fmadd_ps(w, xv, acc1);
        }
      }
  }
  y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - 32.0f * _mm512_reduce_add_ps(accm) + (bias ? bias[n] : 0.0f);
}

// M rows of x against weight row n: the row's values are decoded once per block and serve all M rows.
template <class B, int M>
void gemv_one_row(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y,
                  int64_t ldy, const float* bias, int64_t n) {
  const int64_t nb = K / B::QK;
  const uint8_t* row = W + n * row_bytes;
  constexpr int A = M == 1 ? 2 : 1;  // accumulators per row of x: two independent sums when there is one row
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  if constexpr (Unscaled<B>::value) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * 32;
      const uint8_t* blk = row + b * B::BYTES;
      prefetch_block<B>(blk);
      __m512 lo, hi;
      Unscaled<B>::q(blk, lo, hi);
      const __m512 d = block_scale(blk);
      lo = _mm512_mul_ps(lo, d);
      hi = _mm512_mul_ps(hi, d);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + m * ldx), acc[m][0]);
        acc[m][A - 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + m * ldx + 16), acc[m][A - 1]);
      }
    }
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * B::QK;
      const uint8_t* blk = row + b * B::BYTES;
      prefetch_block<B>(blk);
      B::vec(blk, [&](int v, __m512 w) {
        for (int m = 0; m < M; ++m)
          acc[m][v % A] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + m * ldx + 16 * v), acc[m][v % A]);
      });
    }
  }
  const float add = bias ? bias[n] : 0.0f;
  for (int m = 0; m < M; ++m) {
    __m512 s = acc[m][0];
    if constexpr (A == 2) s = _mm512_add_ps(s, acc[m][1]);
    y[m * ldy + n] = _mm512_reduce_add_ps(s) + add;
  }
}

template <class B, int M>
void gemv_rows(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
               const float* bias, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if constexpr (M == 1 && Unscaled<B>::value)
    for (; n + 2 <= n1; n += 2) gemv1_unscaled_pair<B>(W, row_bytes, K, x, y, bias, n);
  for (; n < n1; ++n) gemv_one_row<B, M>(W, row_bytes, K, x, ldx, y, ldy, bias, n);
}
#elif QE_AVX2
// The same GEMV structure on 8-lane AVX2 vectors (no AVX-512: e.g. AMD Zen 2/3). Prefetch as above.

// A Q8_0 or Q5_0 block's values, unscaled (q, or q - 16 for Q5_0), 8 at a time as exact small integers in
// float32: `at(b, v)` gives values [8v, 8v + 8) of block b. Each is widened straight from memory (measured on
// Zen 3: widening from a register, after one 32-byte load, ran the Q8_0 product 1.6x slower).
template <class B>
struct Ints8 : std::false_type {};
template <>
struct Ints8<Q8_0> : std::true_type {
  static inline __m256 at(const uint8_t* b, int v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * v))));
  }
};
// Q5_0's fifth bits through a table: entry i holds, for bits j = 0..7 of the byte i, 0 where bit j is set and
// -16 where it is clear, so nibble + entry = q - 16 in one add (the bit tests cost four operations; the
// table's 8 KiB stay in L1). 1.8x the speed of assembling the 32 values as bytes first.
struct FifthBits {
  alignas(32) int32_t entry[256][8];
  FifthBits() {
    for (int i = 0; i < 256; ++i)
      for (int j = 0; j < 8; ++j) entry[i][j] = ((i >> j) & 1) ? 0 : -16;
  }
};
const FifthBits fifth_bits;
template <>
struct Ints8<Q5_0> : std::true_type {
  static inline __m256 at(const uint8_t* b, int v) {  // v < 2: low nibbles of bytes 8v.., else high nibbles
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 6 + 8 * (v & 1))));
    const __m256i nibble = v < 2 ? _mm256_and_si256(q, _mm256_set1_epi32(15)) : _mm256_srli_epi32(q, 4);
    const __m256i offset = _mm256_load_si256(reinterpret_cast<const __m256i*>(fifth_bits.entry[b[2 + v]]));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(nibble, offset));
  }
};

// Sums of every 32 (Q4_K's minimums) or 16 (Q6_K's offset) values of x.
void sums32(const float* x, int64_t K, float* out) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* p = x + 32 * b;
    out[b] = hsum8(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                 _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24))));
  }
}
void sums16(const float* x, int64_t K, float* out) {
  for (int64_t b = 0; b < K / 16; ++b) out[b] = hsum8(_mm256_add_ps(_mm256_loadu_ps(x + 16 * b), _mm256_loadu_ps(x + 16 * b + 8)));
}

// One row of x against Q4_K weight row n with the scales factored out, as the AVX-512 gemv1_q4k.
void gemv1_q4k(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, const float* xs, float* y,
               const float* bias, int64_t n) {
  const uint8_t* row = W + n * row_bytes;
  const __m256i fifteen = _mm256_set1_epi32(15);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * Q4_K::BYTES;
    prefetch_block<Q4_K>(blk);
    __m256 ds, dm;
    q4k_scales(blk, ds, dm);
    accm = _mm256_fmadd_ps(dm, _mm256_loadu_ps(xs + 8 * b), accm);
    alignas(32) float dsa[8];
    _mm256_store_ps(dsa, ds);
    const uint8_t* qs = blk + 16;
    const float* xb = x + 256 * b;
    for (int g = 0; g < 4; ++g) {
      const float* xg = xb + 64 * g;
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      for (int part = 0; part < 4; ++part) {
        const __m256i q = bytes8(qs + 32 * g + 8 * part);
        lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, fifteen)), _mm256_loadu_ps(xg + 8 * part), lo);
        hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), _mm256_loadu_ps(xg + 32 + 8 * part), hi);
      }
      acc0 = _mm256_fmadd_ps(lo, _mm256_set1_ps(dsa[2 * g]), acc0);
      acc1 = _mm256_fmadd_ps(hi, _mm256_set1_ps(dsa[2 * g + 1]), acc1);
    }
  }
  y[n] = hsum8(_mm256_add_ps(acc0, acc1)) - hsum8(accm) + (bias ? bias[n] : 0.0f);
}

// One row of x against Q6_K weight row n with scales and offset factored out, as the AVX-512 gemv1_q6k. Each 8
// low-nibble bytes and 8 high-bit bytes are widened from memory once and serve four 8-value groups (1.2x the
// speed of assembling 16 values as bytes and widening those from the register).
void gemv1_q6k(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, const float* xs, float* y,
               const float* bias, int64_t n) {
  const uint8_t* row = W + n * row_bytes;
  const __m256i low4 = _mm256_set1_epi32(0x0F), high2 = _mm256_set1_epi32(0x30);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * Q6_K::BYTES;
    prefetch_block<Q6_K>(blk);
    const uint8_t *ql = blk, *qh = blk + 128;
    const __m256 d = _mm256_set1_ps(f16(blk + 208));
    const __m256 s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 192)))), d);
    const __m256 s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 200)))), d);
    accm = _mm256_fmadd_ps(s0, _mm256_loadu_ps(xs + 16 * b), accm);
    accm = _mm256_fmadd_ps(s1, _mm256_loadu_ps(xs + 16 * b + 8), accm);
    alignas(32) float sa[16];
    _mm256_store_ps(sa, s0);
    _mm256_store_ps(sa + 8, s1);
    const float* xb = x + 256 * b;
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {  // values l = 16 half .. 16 half + 15 of each 32: one scale each
        __m256 p[4];
        for (int c = 2 * half; c < 2 * half + 2; ++c) {
          const __m256i L0 = bytes8(ql + 64 * h + 8 * c), L1 = bytes8(ql + 64 * h + 32 + 8 * c);
          const __m256i H = bytes8(qh + 32 * h + 8 * c);
          for (int t = 0; t < 4; ++t) {
            const __m256i Lb = (t & 1) ? L1 : L0;
            const __m256i low = t < 2 ? _mm256_and_si256(Lb, low4) : _mm256_srli_epi32(Lb, 4);
            const __m256i hs = t == 0 ? _mm256_slli_epi32(H, 4) : t == 1 ? _mm256_slli_epi32(H, 2) : t == 2 ? H : _mm256_srli_epi32(H, 2);
            const __m256 w = _mm256_cvtepi32_ps(_mm256_or_si256(low, _mm256_and_si256(hs, high2)));
            const __m256 xv = _mm256_loadu_ps(xb + 128 * h + 32 * t + 8 * c);
            p[t] = c == 2 * half ? _mm256_mul_ps(w, xv) : _mm256_fmadd_ps(w, xv, p[t]);
          }
        }
        for (int t = 0; t < 4; ++t) {
          const __m256 s = _mm256_set1_ps(sa[8 * h + 2 * t + half]);
          if (t & 1)
            acc1 = _mm256_fmadd_ps(p[t], s, acc1);
          else
            acc0 = _mm256_fmadd_ps(p[t], s, acc0);
        }
      }
  }
  y[n] = hsum8(_mm256_add_ps(acc0, acc1)) - 32.0f * hsum8(accm) + (bias ? bias[n] : 0.0f);
}

// M rows of x against weight row n: the row's values are decoded once per block and serve all M rows.
template <class B, int M>
void gemv_one_row(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y,
                  int64_t ldy, const float* bias, int64_t n) {
  const int64_t nb = K / B::QK;
  const uint8_t* row = W + n * row_bytes;
  // Independent sums per row of x: enough chains to hide the FMA latency (4 cycles), few enough for 16 registers.
  constexpr int A = M <= 3 ? 4 : M == 4 ? 2 : 1;
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  if constexpr (Ints8<B>::value) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * 32;
      const uint8_t* blk = row + b * B::BYTES;
      prefetch_block<B>(blk);
      const __m256 d = _mm256_set1_ps(f16(blk));
      if constexpr (M == 1) {  // the scale applied once per block, to the block's partial sum
        __m256 p0 = _mm256_mul_ps(Ints8<B>::at(blk, 0), _mm256_loadu_ps(xb));
        __m256 p1 = _mm256_mul_ps(Ints8<B>::at(blk, 1), _mm256_loadu_ps(xb + 8));
        p0 = _mm256_fmadd_ps(Ints8<B>::at(blk, 2), _mm256_loadu_ps(xb + 16), p0);
        p1 = _mm256_fmadd_ps(Ints8<B>::at(blk, 3), _mm256_loadu_ps(xb + 24), p1);
        // Alternate two accumulators by a branch: indexing acc[0][b & 3] kept them in memory (8 % slower).
        if (b & 1)
          acc[0][1] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), d, acc[0][1]);
        else
          acc[0][0] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), d, acc[0][0]);
      } else {
        for (int v = 0; v < 4; ++v) {
          const __m256 w = _mm256_mul_ps(Ints8<B>::at(blk, v), d);
          for (int m = 0; m < M; ++m)
            acc[m][v % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * ldx + 8 * v), acc[m][v % A]);
        }
      }
    }
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * B::QK;
      const uint8_t* blk = row + b * B::BYTES;
      prefetch_block<B>(blk);
      B::vec8(blk, [&](int v, __m256 w) {
        for (int m = 0; m < M; ++m)
          acc[m][v % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * ldx + 8 * v), acc[m][v % A]);
      });
    }
  }
  store_sums<M, A>(acc, y, ldy, bias, n);
}

template <class B, int M>
void gemv_rows(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
               const float* bias, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) gemv_one_row<B, M>(W, row_bytes, K, x, ldx, y, ldy, bias, n);
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

// 8-lane kernels for AVX2 and AVX-512 builds alike: Q5_0_FIELDS at 1-8 rows of x, K-quants at 2-8 (AVX-512
// builds take them from 3). On Zen 4, whose 512-bit operations are two 256-bit halves, they ran faster than
// the 16-lane decodes (docs/benchmarks.md, eighteenth pass).
#if QE_AVX512 || QE_AVX2
// Q5F (quant_blocks.h): M rows of x with each value scaled by 2^-shift of its field, exactly, so a field can be
// multiplied where it sits in its lane: (q 2^s)(x 2^-s) is the product q x, rounded the same. The rows are
// interleaved 8 values at a time (values 8c .. 8c + 7 of rows 0 .. M - 1, then of c + 1), so the GEMVs find
// every x vector of a block at a fixed offset from one pointer (with rows K apart, the compiler kept 16 x M
// addresses and spilled them: 2-8 rows ran at 0.6-0.8x Q8_0's speed).
// (Q6F reads x the same way, with its own shifts.)
template <class B>
void fields_x(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 s = _mm256_set1_ps(std::ldexp(1.0f, -B::shift(static_cast<int>(k % B::QK) / 8)));
    for (int64_t m = 0; m < M; ++m)
      _mm256_storeu_ps(out + k * M + 8 * m, _mm256_mul_ps(_mm256_loadu_ps(x + m * K + k), s));
  }
}

#if QE_AVX512
// Rows of x interleaved 8 values at a time, as fields_x without its scaling (gemvm_q4k's IL form).
void rows_by_8(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t k = 0; k < K; k += 8)
    for (int64_t m = 0; m < M; ++m) _mm256_storeu_ps(out + k * M + 8 * m, _mm256_loadu_ps(x + m * K + k));
}
#endif

// f(std::integral_constant<int, R>{}) for the row count M, R from LO to REG_ROWS (8; more rows count as 8): the
// GEMVs' row counts are template arguments.
template <int LO, class F>
inline void with_row_count(int64_t M, F&& f) {
  if constexpr (LO < 8) {
    if (M == LO) return f(std::integral_constant<int, LO>{});
    return with_row_count<LO + 1>(M, f);
  } else {
    return f(std::integral_constant<int, 8>{});
  }
}

inline __m256 q5f_field(const __m256i (&g)[3], int v) {  // q 2^shift(v) of values 8v .. 8v + 7, as floats
  return _mm256_cvtepi32_ps(_mm256_and_si256(g[Q5F::group(v)], _mm256_set1_epi32(31 << Q5F::shift(v))));
}

inline __m256 q5f_field(const uint8_t* blk, int v) {  // the same, the group read from memory
  const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * Q5F::group(v)));
  return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(31 << Q5F::shift(v))));
}

inline void q5f_load(const uint8_t* blk, __m256i (&g)[3]) {
  for (int i = 0; i < 3; ++i) g[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * i));
}

inline void q6f_scales(const uint8_t* blk, float* s) {  // d * sc[j] for the 16 scales, as Q6_K's dequantisation
  const __m256 d = _mm256_set1_ps(f16(blk + 208));
  for (int h = 0; h < 2; ++h) {
    const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 192 + 8 * h)));
    _mm256_store_ps(s + 8 * h, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)));
  }
}

inline __m128 q5f_scales(const uint8_t* blk) {  // the four blocks' d
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 96)));
}

// One row of x (as fields_x) against Q5F weight row n: per Q5_0 block, four 8-value partial sums of q x, scaled
// by the block's d once. Q5_0's -16 is taken off at the end: -16 times the sum over blocks of d times the sum of
// x over the block (xs: sums of every 32 values of x).
void gemv1_q5f(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xf, const float* xs, float* y,
               const float* bias, int64_t n) {
  const uint8_t* row = W + n * row_bytes;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128 offsets = _mm_setzero_ps();
  for (int64_t b = 0; b < K / Q5F::QK; ++b) {
    const uint8_t* blk = row + b * Q5F::BYTES;
    prefetch_block<Q5F>(blk);
    const __m128 d4 = q5f_scales(blk);
    offsets = _mm_fmadd_ps(d4, _mm_loadu_ps(xs + 4 * b), offsets);
    alignas(16) float d[4];
    _mm_store_ps(d, d4);
    __m256i g[3];
    q5f_load(blk, g);
    const float* xb = xf + Q5F::QK * b;
    __m256 p[4][2];
#pragma GCC unroll 16
    for (int v = 0; v < 16; ++v) {
      const __m256 f = q5f_field(g, v), xv = _mm256_loadu_ps(xb + 8 * v);
      p[v / 4][v & 1] = v % 4 < 2 ? _mm256_mul_ps(f, xv) : _mm256_fmadd_ps(f, xv, p[v / 4][v & 1]);
    }
    acc0 = _mm256_fmadd_ps(_mm256_add_ps(p[0][0], p[0][1]), _mm256_broadcast_ss(d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_add_ps(p[1][0], p[1][1]), _mm256_broadcast_ss(d + 1), acc1);
    acc0 = _mm256_fmadd_ps(_mm256_add_ps(p[2][0], p[2][1]), _mm256_broadcast_ss(d + 2), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_add_ps(p[3][0], p[3][1]), _mm256_broadcast_ss(d + 3), acc1);
  }
  y[n] = hsum8(_mm256_add_ps(acc0, acc1)) - 16.0f * hsum4(offsets) + (bias ? bias[n] : 0.0f);
}

// 2-8 rows of x (as fields_x) against Q5F weight row n: each 8 fields scaled by their block's d once (d q 2^s,
// exact), one FMA per row of x. A: independent sums per row of x. HOLD keeps a block's three 32-byte groups in
// registers, else each AND reads its group from L1; INL sums the offsets (as gemv1_q5f) in the block loop, else
// in a pass over the scales after it: with 8 sums, holding both spilled (0.81-0.85x Q8_0's speed at 2 and 4
// rows in a cache-resident layer).
template <int M, int A, bool HOLD, bool INL>
void gemvm_q5f(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xf, const float* xs, float* y,
               int64_t ldy, const float* bias, int64_t n) {
  const uint8_t* row = W + n * row_bytes;
  __m256 acc[M][A];
  __m128 offsets[M];
  for (int m = 0; m < M; ++m) {
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    offsets[m] = _mm_setzero_ps();
  }
  for (int64_t b = 0; b < K / Q5F::QK; ++b) {
    const uint8_t* blk = row + b * Q5F::BYTES;
    prefetch_block<Q5F>(blk);
    const __m128 d4 = q5f_scales(blk);
    if constexpr (INL)
      for (int m = 0; m < M; ++m) offsets[m] = _mm_fmadd_ps(d4, _mm_loadu_ps(xs + m * (K / 32) + 4 * b), offsets[m]);
    alignas(16) float d[4];
    _mm_store_ps(d, d4);
    __m256i g[3];
    if constexpr (HOLD) q5f_load(blk, g);
    const float* xb = xf + Q5F::QK * M * b;
#pragma GCC unroll 16
    for (int v = 0; v < 16; ++v) {
      const __m256 f = HOLD ? q5f_field(g, v) : q5f_field(blk, v);
      const __m256 w = _mm256_mul_ps(f, _mm256_broadcast_ss(d + v / 4));
      for (int m = 0; m < M; ++m)
        acc[m][v % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + 8 * (M * v + m)), acc[m][v % A]);
    }
  }
  if constexpr (!INL)
    for (int64_t b = 0; b < K / Q5F::QK; ++b) {
      const __m128 d4 = q5f_scales(row + b * Q5F::BYTES);
      for (int m = 0; m < M; ++m) offsets[m] = _mm_fmadd_ps(d4, _mm_loadu_ps(xs + m * (K / 32) + 4 * b), offsets[m]);
    }
  const float add = bias ? bias[n] : 0.0f;
  for (int m = 0; m < M; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
    y[m * ldy + n] = hsum8(s) - 16.0f * hsum4(offsets[m]) + add;
  }
}

template <int M>
inline void gemvm_q5f_row(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xf, const float* xs, float* y,
                          int64_t ldy, const float* bias, int64_t n) {
  gemvm_q5f<M, M <= 4 ? 2 : 1, M != 4, M <= 3>(W, row_bytes, K, xf, xs, y, ldy, bias, n);
}

void gemv_q5f(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xf, int64_t M, const float* xs, float* y,
              int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) switch (M) {
      case 1: gemv1_q5f(W, row_bytes, K, xf, xs, y, bias, n); break;
      case 2: gemvm_q5f_row<2>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
      case 3: gemvm_q5f_row<3>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
      case 4: gemvm_q5f_row<4>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
      case 5: gemvm_q5f_row<5>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
      case 6: gemvm_q5f_row<6>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
      case 7: gemvm_q5f_row<7>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
      default: gemvm_q5f_row<8>(W, row_bytes, K, xf, xs, y, ldy, bias, n); break;
    }
}

// One row of x (as fields_x<Q6F>) against Q6F weight row n: per 16 values (one Q6_K scale), two 8-value
// products of q x summed and scaled once; Q6_K's -32 is taken off at the end with the sums of 16 values of x
// (xs), as gemv1_q6k.
void gemv1_q6f(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xf, const float* xs, float* y,
               const float* bias, int64_t n) {
  const uint8_t* row = W + n * row_bytes;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), offsets = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / Q6F::QK; ++b) {
    const uint8_t* blk = row + b * Q6F::BYTES;
    prefetch_block<Q6F>(blk);
    alignas(32) float s[16];
    q6f_scales(blk, s);
    offsets = _mm256_fmadd_ps(_mm256_load_ps(s), _mm256_loadu_ps(xs + 16 * b), offsets);
    offsets = _mm256_fmadd_ps(_mm256_load_ps(s + 8), _mm256_loadu_ps(xs + 16 * b + 8), offsets);
    __m256i g[6];
    Q6F::load(blk, g);
    const float* xb = xf + Q6F::QK * b;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const __m256 f0 = _mm256_cvtepi32_ps(Q6F::field(g, 2 * j)), f1 = _mm256_cvtepi32_ps(Q6F::field(g, 2 * j + 1));
      const __m256 p = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xb + 16 * j + 8), _mm256_mul_ps(f0, _mm256_loadu_ps(xb + 16 * j)));
      if (j & 1)
        acc1 = _mm256_fmadd_ps(p, _mm256_broadcast_ss(s + j), acc1);
      else
        acc0 = _mm256_fmadd_ps(p, _mm256_broadcast_ss(s + j), acc0);
    }
  }
  y[n] = hsum8(_mm256_add_ps(acc0, acc1)) - 32.0f * hsum8(offsets) + (bias ? bias[n] : 0.0f);
}

// 2-8 rows of x against Q6F weight row n: each 8 values offset by -32 and scaled to the dequantised float32 once,
// one FMA per row of x. FIELDS: x as fields_x<Q6F> (rows interleaved, each value scaled by 2^-shift of its
// field), the fields offset where they sit ((q - 32) 2^s, exact) and no shift; else x as given, rows K apart.
// With rows apart, the compiler keeps the 8 x M addresses in scalar registers and spills them (~2 scalar
// instructions per FMA at 8 rows), but from L2 the M rows are M streams that the prefetchers follow: the
// interleaved rows (one stream) ran 1.2-1.35x slower at 3-4 rows; at 7-8 rows, in chunks of K that keep x in
// L1, they run 1.3x faster (the Qwen3-1.7B-shaped down projection, docs/benchmarks.md, fortieth pass).
template <int M, bool FIELDS>
void gemvm_q6f(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
               const float* bias, int64_t n) {
  constexpr int A = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  const uint8_t* row = W + n * row_bytes;
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / Q6F::QK; ++b) {
    const uint8_t* blk = row + b * Q6F::BYTES;
    prefetch_block<Q6F>(blk);
    alignas(32) float s[16];
    q6f_scales(blk, s);
    __m256i g[6];
    Q6F::load(blk, g);
    const float* xb = x + Q6F::QK * (FIELDS ? M : 1) * b;
#pragma GCC unroll 32
    for (int v = 0; v < 32; ++v) {
      const __m256i q = FIELDS ? _mm256_sub_epi32(Q6F::field(g, v), _mm256_set1_epi32(32 << Q6F::shift(v))) : Q6F::q8(g, v);
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(s + v / 2));
      for (int m = 0; m < M; ++m) {
        const float* xv = FIELDS ? xb + 8 * (M * v + m) : xb + m * ldx + 8 * v;
        acc[m][v % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xv), acc[m][v % A]);
      }
    }
  }
  store_sums<M, A>(acc, y, ldy, bias, n);
}

// Weight rows [n0, n1) of a block type of QK values in block_bytes against M rows of x, where row(Wc, k0, kc, out,
// ldo, bias, n) writes the sums over values [k0, k0 + kc) of row n of the weights Wc points into (out[m ldo + n]).
// Where the M rows of x outgrow L1 (the down projection's 8 x 4864 floats are 152 KiB), a kernel that runs each
// weight row over all of K reads every x value again from L2 for each row, a 32-byte load per FMA: more than L2
// feeds, so 8 rows of the down projection ran at ~2/3 of gate+up's multiply-adds a second. Here groups of 16
// weight rows take K in chunks of ~16 KiB of x, which stay in L1 for the group; the chunks' sums are added after.
template <int M, class Row>
void in_chunks(const uint8_t* W, int64_t row_bytes, int64_t K, int64_t QK, int64_t block_bytes, float* y,
               int64_t ldy, const float* bias, int64_t n0, int64_t n1, Row&& row) {
  constexpr int64_t X_BYTES = 16 << 10, G = 16;
  const int64_t chunk = std::max<int64_t>(1, X_BYTES / (M * QK * 4)) * QK;
  if (K <= 2 * chunk) {
    for (int64_t n = n0; n < n1; ++n) row(W, 0, K, y, ldy, bias, n);
    return;
  }
  float part[M * G], sums[M * G];
  for (int64_t g0 = n0; g0 < n1; g0 += G) {
    const int64_t rows = std::min(G, n1 - g0);
    std::fill(sums, sums + M * G, 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t kc = std::min(chunk, K - k0);
      const uint8_t* Wc = W + g0 * row_bytes + k0 / QK * block_bytes;
      for (int64_t j = 0; j < rows; ++j) row(Wc, k0, kc, part, G, nullptr, j);
      for (int m = 0; m < M; ++m)
        for (int64_t j = 0; j < rows; ++j) sums[m * G + j] += part[m * G + j];
    }
    for (int m = 0; m < M; ++m)
      for (int64_t j = 0; j < rows; ++j) y[m * ldy + g0 + j] = sums[m * G + j] + (bias ? bias[g0 + j] : 0.0f);
  }
}

// M rows of x against Q6F weight rows [n0, n1): x as given (x) and as fields_x<Q6F> (xf: one row, with its sums
// of 16, xs; or FIELDS_ROWS and more).
constexpr int FIELDS_ROWS = 7;
void gemv_q6f(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, const float* xf, const float* xs,
              int64_t M, float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  if (M == 1) {
    for (int64_t n = n0; n < n1; ++n) gemv1_q6f(W, row_bytes, K, xf, xs, y, bias, n);
    return;
  }
  auto rows = [&](auto m) {
    constexpr int R = decltype(m)::value;
    if constexpr (R >= FIELDS_ROWS) {
      const auto row = [&](const uint8_t* Wc, int64_t k0, int64_t kc, float* out, int64_t ldo, const float* b, int64_t n) {
        gemvm_q6f<R, true>(Wc, row_bytes, kc, xf + k0 * R, 0, out, ldo, b, n);
      };
      in_chunks<R>(W, row_bytes, K, Q6F::QK, Q6F::BYTES, y, ldy, bias, n0, n1, row);
    } else {  // (in chunks of K, rows apart, it ran no faster, 25 % slower at 2)
      for (int64_t n = n0; n < n1; ++n) gemvm_q6f<R, false>(W, row_bytes, K, x, K, y, ldy, bias, n);
    }
  };
  with_row_count<2>(M, rows);
}

// 2-8 rows of x against a K-quant weight row: each 8 weights are decoded and scaled once (the float32 values
// the dequantisation gives, Q4_K's minimums apart) and serve every row with one FMA. The generic path (vec8,
// below) decodes through per-sub-block tables and took a decode step of two sequences from 1x to 1.6x the time
// of one. A: independent sums per row of x, enough to hide the FMA latency.
template <int M>
constexpr int kq_sums() { return M <= 2 ? 4 : M <= 4 ? 2 : 1; }

// Q4_K: w = d·sc·q − dmin·m; the minimums' part is taken off per block with the sums of 32 values of each row
// of x (xs, K/32 a row).
// IL: x as rows_by_8 (rows interleaved 8 values at a time; ldx unused), every x vector at a fixed offset.
template <int M, bool IL = false>
void gemvm_q4k(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, const float* xs,
               int64_t ldxs, float* y, int64_t ldy, const float* bias, int64_t n) {
  constexpr int A = kq_sums<M>();
  const uint8_t* row = W + n * row_bytes;
  const __m256i fifteen = _mm256_set1_epi32(15);
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * Q4_K::BYTES;
    prefetch_block<Q4_K>(blk);
    __m256 ds, dm;
    q4k_scales(blk, ds, dm);
    for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fnmadd_ps(dm, _mm256_loadu_ps(xs + m * ldxs + 8 * b), acc[m][0]);
    alignas(32) float dsa[8];
    _mm256_store_ps(dsa, ds);
    const uint8_t* qs = blk + 16;
    const float* xb = x + 256 * (IL ? M : 1) * b;
    for (int g = 0; g < 4; ++g) {
      const __m256 slo = _mm256_broadcast_ss(dsa + 2 * g), shi = _mm256_broadcast_ss(dsa + 2 * g + 1);
      for (int part = 0; part < 4; ++part) {
        const __m256i q = bytes8(qs + 32 * g + 8 * part);
        const __m256 wl = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, fifteen)), slo);
        const __m256 wh = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), shi);
        const int c = 8 * g + part;  // values 8c .. 8c + 7 of the block (wl), and 8 (c + 4) .. (wh)
        constexpr int lo = 0, hi = A > 1 ? 1 : 0;
        const int pair = A == 4 ? 2 * (part & 1) : 0;
        for (int m = 0; m < M; ++m) {
          const float *x_lo = IL ? xb + 8 * (M * c + m) : xb + m * ldx + 8 * c, *x_hi = IL ? x_lo + 32 * M : x_lo + 32;
          acc[m][pair + lo] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x_lo), acc[m][pair + lo]);
          acc[m][pair + hi] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x_hi), acc[m][pair + hi]);
        }
      }
    }
  }
  store_sums<M, A>(acc, y, ldy, bias, n);
}

// Q6_K: w = d·sc·(q − 32), q from 4 low bits (ql) and 2 high bits (qh); each 8 bytes of ql and qh widened once
// serve four 8-value groups, as in gemv1_q6k.
template <int M>
void gemvm_q6k(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, float* y,
               int64_t ldy, const float* bias, int64_t n) {
  constexpr int A = kq_sums<M>();
  const uint8_t* row = W + n * row_bytes;
  const __m256i low4 = _mm256_set1_epi32(0x0F), high2 = _mm256_set1_epi32(0x30), offset = _mm256_set1_epi32(32);
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * Q6_K::BYTES;
    prefetch_block<Q6_K>(blk);
    const uint8_t *ql = blk, *qh = blk + 128;
    const __m256 d = _mm256_set1_ps(f16(blk + 208));
    alignas(32) float sa[16];  // d·sc of each 16 values: exact in float32 (11-bit d times an int8)
    _mm256_store_ps(sa, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 192)))), d));
    _mm256_store_ps(sa + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 200)))), d));
    const float* xb = x + 256 * b;
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 4; ++c) {
        const __m256i L0 = bytes8(ql + 64 * h + 8 * c), L1 = bytes8(ql + 64 * h + 32 + 8 * c);
        const __m256i H = bytes8(qh + 32 * h + 8 * c);
        for (int t = 0; t < 4; ++t) {  // values 128 h + 32 t + 8 c .. + 7
          const __m256i Lb = (t & 1) ? L1 : L0;
          const __m256i low = t < 2 ? _mm256_and_si256(Lb, low4) : _mm256_srli_epi32(Lb, 4);
          const __m256i hs = t == 0 ? _mm256_slli_epi32(H, 4) : t == 1 ? _mm256_slli_epi32(H, 2) : t == 2 ? H : _mm256_srli_epi32(H, 2);
          const __m256i q = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_and_si256(hs, high2)), offset);
          const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(sa + 8 * h + 2 * t + (c >> 1)));
          const float* xp = xb + 128 * h + 32 * t + 8 * c;
          for (int m = 0; m < M; ++m) acc[m][t % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + m * ldx), acc[m][t % A]);
        }
      }
  }
  store_sums<M, A>(acc, y, ldy, bias, n);
}

// Weight rows [n0, n1) of a K-quant against M (2-8) rows of x.
template <class B, int M>
void gemvm_kq_rows(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t ldx, const float* xs,
                   float* y, int64_t ldy, const float* bias, int64_t n0, int64_t n1, const float* x8 = nullptr) {
  const auto row = [&](const uint8_t* Wc, int64_t k0, int64_t kc, float* out, int64_t ldo, const float* b, int64_t n) {
    if constexpr (std::is_same<B, Q4_K>::value) {
      if (x8)
        gemvm_q4k<M, true>(Wc, row_bytes, kc, x8 + k0 * M, 0, xs + k0 / 32, K / 32, out, ldo, b, n);
      else
        gemvm_q4k<M>(Wc, row_bytes, kc, x + k0, ldx, xs + k0 / 32, K / 32, out, ldo, b, n);
    }
    else
      gemvm_q6k<M>(Wc, row_bytes, kc, x + k0, ldx, out, ldo, b, n);
  };
  // In chunks of K: Q4_K from 3 rows (1.15-1.42x at 3-8 rows of the demo model's down projection, Zen 4), Q6_K,
  // whose heavier decode keeps it bound by its arithmetic longer, from 7 (at 3-6 rows it ran 0.85-0.97x, 1.12x
  // at 8); benchmarks/kernels.py --baseline.
  if constexpr (std::is_same<B, Q4_K>::value ? M >= 3 : M >= 7)
    in_chunks<M>(W, row_bytes, K, B::QK, B::BYTES, y, ldy, bias, n0, n1, row);
  else
    for (int64_t n = n0; n < n1; ++n) row(W, 0, K, y, ldy, bias, n);
}

// x8: x as rows_by_8 (Q4_K from X8_ROWS rows, AVX-512 builds), or null.
template <class B>
void gemvm_kq(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, const float* xs, float* y,
              int64_t ldy, const float* bias, int64_t n0, int64_t n1, const float* x8 = nullptr) {
  with_row_count<2>(M, [&](auto m) {
    gemvm_kq_rows<B, decltype(m)::value>(W, row_bytes, K, x, K, xs, y, ldy, bias, n0, n1, x8);
  });
}

#if QE_AVX512
// Q8_0 and Q5_0 (blocks of 32 values with one scale) at CHUNKED_ROWS to REG_ROWS rows: in chunks of K, as the
// K-quants, where x outgrows L1 from K = 1024 (an LM head over 2048 hidden values at 8 rows: 64 KiB). The
// Qwen3-1.7B-shaped LM head, 151936 x 2048 Q8_0, ran 1.15-1.35x faster at 6-8 rows, 0.9x at 5 (AVX-512, Zen 4;
// docs/benchmarks.md, fortieth pass). Rows interleaved as Q5F's fields_x on top made no difference; the AVX2
// build's 8-lane kernel (same host) gained nothing in chunks, so it reads x whole.
constexpr int CHUNKED_ROWS = 6;
template <class B>
void gemv_in_chunks(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* y,
                    int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  auto rows = [&](auto m) {
    constexpr int R = decltype(m)::value;
    in_chunks<R>(W, row_bytes, K, B::QK, B::BYTES, y, ldy, bias, n0, n1,
                 [&](const uint8_t* Wc, int64_t k0, int64_t kc, float* out, int64_t ldo, const float* b, int64_t n) {
                   gemv_one_row<B, R>(Wc, row_bytes, kc, x + k0, K, out, ldo, b, n);
                 });
  };
  with_row_count<CHUNKED_ROWS>(M, rows);
}

// Whether 512-bit operations run at full width here (Intel), not in two halves (AMD's Zen 4): there the 8-lane
// K-quant kernels above give away half of every multiply-add.
bool wide_vectors = !__builtin_cpu_is("amd");  // tests switch it to run either kernel

// K-quants at 3-8 rows where vectors are wide: the 16-lane decode (B::vec), in chunks of K that keep x in L1
// (Q6_K from 7 rows, as the 8-lane kernel). Intel Xeon with AMX, the demo model's down projection, against the
// 8-lane kernels (benchmarks/kernels.py --baseline; docs/benchmarks.md, twenty-eighth pass): Q4_K 1.12x at 3
// rows to 1.40-1.45x at 7-8, Q6_K 1.03-1.18x.
template <class B, int M>
void gemvm_kq_wide_rows(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, float* y, int64_t ldy,
                        const float* bias, int64_t n0, int64_t n1) {
  if constexpr (std::is_same<B, Q6_K>::value && M < 7) {
    for (int64_t n = n0; n < n1; ++n) gemv_one_row<B, M>(W, row_bytes, K, x, K, y, ldy, bias, n);
    return;
  }
  in_chunks<M>(W, row_bytes, K, B::QK, B::BYTES, y, ldy, bias, n0, n1,
               [&](const uint8_t* Wc, int64_t k0, int64_t kc, float* out, int64_t ldo, const float* b, int64_t n) {
                 gemv_one_row<B, M>(Wc, row_bytes, kc, x + k0, K, out, ldo, b, n);
               });
}

template <class B>
void gemvm_kq_wide(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* y, int64_t ldy,
                   const float* bias, int64_t n0, int64_t n1) {
  switch (M) {
    case 3: return gemvm_kq_wide_rows<B, 3>(W, row_bytes, K, x, y, ldy, bias, n0, n1);
    case 4: return gemvm_kq_wide_rows<B, 4>(W, row_bytes, K, x, y, ldy, bias, n0, n1);
    case 5: return gemvm_kq_wide_rows<B, 5>(W, row_bytes, K, x, y, ldy, bias, n0, n1);
    case 6: return gemvm_kq_wide_rows<B, 6>(W, row_bytes, K, x, y, ldy, bias, n0, n1);
    case 7: return gemvm_kq_wide_rows<B, 7>(W, row_bytes, K, x, y, ldy, bias, n0, n1);
    default: return gemvm_kq_wide_rows<B, 8>(W, row_bytes, K, x, y, ldy, bias, n0, n1);
  }
}
#endif
#endif

#if !QE_AVX512 && !QE_AVX2
// 4-8 rows of x in portable builds: one row at a time.
template <class B>
void gemm_small(const uint8_t* W, int64_t row_bytes, int64_t K, const float* x, int64_t M, float* y, int64_t ldy,
                const float* bias, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) gemv_rows<B, 1>(W, row_bytes, K, x + m * K, K, y + m * ldy, ldy, bias, n0, n1);
}
#endif

#if QE_AVX512
// Rows m0..m0+15 of x (row pointers; rows past M point at zeros), columns k..k+15, transposed into
// xt[k + i][m0 + j] (ldt floats a row).
inline void transpose16(const float* const* rows, int64_t k, float* out, int64_t ldt) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + k);
  ::transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * ldt, r[i]);
}

// x [M, K] as xt [K, Mp]: Mp = M rounded up to 16, the extra columns zero.
void transpose_x(const float* x, int64_t M, int64_t K, int64_t Mp, float* xt) {
  const std::vector<float> zero(K, 0.0f);
  for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
    const float* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = m0 + i < M ? x + (m0 + i) * K : zero.data();
    for (int64_t k = 0; k < K; k += 16) transpose16(rows, k, xt + k * Mp + m0, Mp);
  }
}

// Many rows of x (4 to 64 sequences decoding together): NR weight rows are dequantised a chunk of KC values at
// a time into a buffer that stays in L1, and each weight value, broadcast, is multiplied with 16 rows of x at
// once from the transposed x — MB x NR accumulators of 16 rows of x each, no horizontal sums.
template <class B, int MB>
void gemm_xt(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xt, int64_t Mp, int64_t M, float* y,
             int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  constexpr int NR = MB == 1 ? 16 : MB == 2 ? 12 : MB == 3 ? 8 : 6;
  constexpr int KC = 256;  // a multiple of every block size
  alignas(64) float wbuf[NR * KC];
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
    // The next group's rows into L2 while this one is multiplied (as the AVX2 gemm_xt below).
    for (int64_t at = (n + NR) * row_bytes, end = std::min(n1, n + 2 * NR) * row_bytes; at < end; at += 64)
      prefetch(W + at);
    __m512 acc[MB][NR];
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int kc = static_cast<int>(std::min<int64_t>(KC, K - k0));
      for (int r = 0; r < nr; ++r) {
        const uint8_t* src = W + (n + r) * row_bytes + k0 / B::QK * B::BYTES;
        if constexpr (Unscaled<B>::value) {  // the same values (q * d), in the decode's lane order
          for (int b = 0; b < kc / 32; ++b) {
            __m512 lo, hi;
            Unscaled<B>::q(src + b * B::BYTES, lo, hi);
            const __m512 d = block_scale(src + b * B::BYTES);
            _mm512_store_ps(wbuf + r * KC + 32 * b, _mm512_mul_ps(lo, d));
            _mm512_store_ps(wbuf + r * KC + 32 * b + 16, _mm512_mul_ps(hi, d));
          }
        } else {
          dequant_row<B>(src, kc, wbuf + r * KC);
        }
      }
      for (int r = nr; r < NR; ++r) std::memset(wbuf + r * KC, 0, sizeof(float) * kc);
      const float* xk = xt + k0 * Mp;
      for (int k = 0; k < kc; ++k) {
        __m512 xv[MB];
        for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(xk + k * Mp + 16 * i);
        for (int r = 0; r < NR; ++r) {
          const __m512 w = _mm512_set1_ps(wbuf[r * KC + k]);
          for (int i = 0; i < MB; ++i) acc[i][r] = _mm512_fmadd_ps(w, xv[i], acc[i][r]);
        }
      }
    }
    alignas(64) float out[16];
    for (int r = 0; r < nr; ++r) {
      const float add = bias ? bias[n + r] : 0.0f;
      for (int i = 0; i < MB; ++i) {
        _mm512_store_ps(out, acc[i][r]);
        for (int l = 0; l < 16 && 16 * i + l < M; ++l) y[(16 * i + l) * ldy + n + r] = out[l] + add;
      }
    }
  }
}

#elif QE_AVX2
// x [M, K] as xt [K, Mp]: Mp = M rounded up to 8, the extra columns zero.
void transpose_x(const float* x, int64_t M, int64_t K, int64_t Mp, float* xt) {
  for (int64_t k = 0; k < K; ++k) {
    float* o = xt + k * Mp;
    for (int64_t m = 0; m < M; ++m) o[m] = x[m * K + k];
    for (int64_t m = M; m < Mp; ++m) o[m] = 0.0f;
  }
}

// More than REG_ROWS rows of x: the AVX-512 gemm_xt on 8 lanes. XT_NR weight rows are dequantised XT_KC values
// at a time into a buffer in L1, and each weight value, broadcast, is multiplied with 8 rows of x at once from
// the transposed x. Rows of x go 16 at a time through the 16 registers (12 sums, 2 x vectors, the weight), their
// sums parked in `sums` between chunks of K. (Zen 3, the demo model's layers: 1.7-1.9x the 8-rows-at-a-time GEMV
// at 16-64 rows, and faster than dequantise + MKL up to 64. At 4-8 rows it only tied the GEMV, with 12 weight
// rows against 8 rows of x.)
constexpr int XT_NR = 6, XT_KC = 256;  // XT_KC: a multiple of every block size

template <int MB, int NR>
inline void xt_panel(const float* wbuf, const float* xk, int64_t Mp, int kc, float* sums) {
  __m256 acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_load_ps(sums + (i * NR + r) * 8);
  for (int k = 0; k < kc; ++k) {
    __m256 xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(xk + k * Mp + 8 * i);
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(wbuf + r * XT_KC + k);
      for (int i = 0; i < MB; ++i) acc[i][r] = _mm256_fmadd_ps(w, xv[i], acc[i][r]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < NR; ++r) _mm256_store_ps(sums + (i * NR + r) * 8, acc[i][r]);
}

template <class B>
void gemm_xt(const uint8_t* W, int64_t row_bytes, int64_t K, const float* xt, int64_t Mp, int64_t M, float* y,
             int64_t ldy, const float* bias, int64_t n0, int64_t n1) {
  constexpr int NR = XT_NR;
  alignas(32) float wbuf[NR * XT_KC];
  alignas(32) float sums[GEMV_ROWS_MAX * NR];  // [block of 8 rows of x][weight row][lane]
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
    // The next group's rows into L2 while this one is multiplied: the weights stream from a page-cache map, where
    // the hardware prefetchers stop at every 4 KiB page. 24 layers streamed from memory, 16-32 rows: gate+up
    // 119-124 → 129-139 G FLOP/s, down (Q6_K) 102-107 → 110-124 (one layer in cache: 153-161 and 108-129).
    for (int64_t at = (n + NR) * row_bytes, end = std::min(n1, n + 2 * NR) * row_bytes; at < end; at += 64)
      prefetch(W + at);
    std::memset(sums, 0, sizeof(float) * Mp * NR);
    for (int64_t k0 = 0; k0 < K; k0 += XT_KC) {
      const int kc = static_cast<int>(std::min<int64_t>(XT_KC, K - k0));
      for (int r = 0; r < nr; ++r) dequant_row<B>(W + (n + r) * row_bytes + k0 / B::QK * B::BYTES, kc, wbuf + r * XT_KC);
      for (int r = nr; r < NR; ++r) std::memset(wbuf + r * XT_KC, 0, sizeof(float) * kc);
      const float* xk = xt + k0 * Mp;
      int64_t m = 0;
      for (; m + 16 <= Mp; m += 16) xt_panel<2, NR>(wbuf, xk + m, Mp, kc, sums + m * NR);
      for (; m < Mp; m += 8) xt_panel<1, NR>(wbuf, xk + m, Mp, kc, sums + m * NR);
    }
    for (int r = 0; r < nr; ++r) {
      const float add = bias ? bias[n + r] : 0.0f;
      for (int64_t m = 0; m < M; ++m) y[m * ldy + n + r] = sums[((m / 8) * NR + r) * 8 + m % 8] + add;
    }
  }
}
#endif

// Rows of x in the forms the kernels read: as given, permuted for Q5_0's lane order (xq, up to REG_ROWS rows),
// transposed and padded to Mp rows (xt, more rows).
struct XForms {
  const float* x;
  const float* xq;
  const float* xt;
  const float* xtq;  // xt of xq (more than REG_ROWS rows with a Q5_0 segment)
  const float* xs;    // sums of every 32 values of x (up to REG_ROWS rows with a Q4_K or Q5F segment)
  const float* xs16;  // sums of every 16 values of x (one row of x with a Q6_K segment)
  const float* xl;    // x in gemv1_q4k's lane order (one or two rows of x with a Q4_K segment, AVX-512)
  const float* xf;    // x as fields_x<Q5F> (up to REG_ROWS rows with a Q5F segment)
  const float* xf6;   // x as fields_x<Q6F> (1 or FIELDS_ROWS to REG_ROWS rows with a Q6F segment)
  const float* x8;    // x as rows_by_8 (X8_ROWS to REG_ROWS rows with a Q4_K segment, AVX-512 on AMD)
  int64_t M, Mp;
};
constexpr int64_t REG_ROWS = 8;  // up to this many rows of x: weights dequantised in registers
constexpr int64_t X8_ROWS = 7;

template <class B>
void gemv(const uint8_t* W, int64_t row_bytes, int64_t K, const XForms& in, float* y, int64_t ldy,
          const float* bias, int64_t n0, int64_t n1) {
#if QE_AVX512
  const float* x = permuted<B>() ? in.xq : in.x;
  if constexpr (std::is_same<B, Q5F>::value)
    if (in.M <= REG_ROWS) return gemv_q5f(W, row_bytes, K, in.xf, in.M, in.xs, y, ldy, bias, n0, n1);
  if constexpr (std::is_same<B, Q6F>::value)
    if (in.M <= REG_ROWS) return gemv_q6f(W, row_bytes, K, in.x, in.xf6, in.xs16, in.M, y, ldy, bias, n0, n1);
  if constexpr (std::is_same<B, Q4_K>::value)
    if (in.M == 1) {
      int64_t n = n0;
      for (; n + 2 <= n1; n += 2) gemv1_q4k<2, 1>(W, row_bytes, K, in.xl, K, in.xs, y, ldy, bias, n);
      if (n < n1) gemv1_q4k<1, 1>(W, row_bytes, K, in.xl, K, in.xs, y, ldy, bias, n);
      return;
    } else if (in.M == 2) {  // in chunks of K where two rows of x outgrow L1 (the down projections)
      auto row = [&](const uint8_t* Wc, int64_t k0, int64_t kc, float* out, int64_t ldo, const float* b, int64_t j) {
        gemv1_q4k<1, 2>(Wc, row_bytes, kc, in.xl + k0, K, in.xs + k0 / 32, out, ldo, b, j);
      };
      return in_chunks<2>(W, row_bytes, K, Q4_K::QK, Q4_K::BYTES, y, ldy, bias, n0, n1, row);
    }
  if constexpr (std::is_same<B, Q6_K>::value)
    if (in.M == 1) {
      for (int64_t n = n0; n < n1; ++n) gemv1_q6k(W, row_bytes, K, x, in.xs16, y, bias, n);
      return;
    }
  // K-quants at 3-8 rows: on AMD, the 8-lane kernels that decode each 8 values once for all rows. On Zen 4 they
  // ran 1.2-1.9x faster than the path before at 4-8 rows (4 weight rows dequantised into a buffer, 4x4 tiles) and
  // 1.1-1.2x the 16-lane decode at 3 (benchmarks/kernels.py, two alternating runs; at 2 rows neither won).
  // Where 512-bit operations run at full width (Intel), the 16-lane decode in chunks of K instead.
  if constexpr (std::is_same<B, Q4_K>::value || std::is_same<B, Q6_K>::value)
    if (in.M >= 3 && in.M <= REG_ROWS) {
      if (!wide_vectors) return gemvm_kq<B>(W, row_bytes, K, in.x, in.M, in.xs, y, ldy, bias, n0, n1, in.x8);
      return gemvm_kq_wide<B>(W, row_bytes, K, in.x, in.M, y, ldy, bias, n0, n1);
    }
  if constexpr (Unscaled<B>::value)
    if (in.M >= CHUNKED_ROWS && in.M <= REG_ROWS) return gemv_in_chunks<B>(W, row_bytes, K, x, in.M, y, ldy, bias, n0, n1);
  if (in.M > REG_ROWS) {
    const float* xt = permuted<B>() ? in.xtq : in.xt;
    switch (in.Mp / 16) {
      case 1: return gemm_xt<B, 1>(W, row_bytes, K, xt, in.Mp, in.M, y, ldy, bias, n0, n1);
      case 2: return gemm_xt<B, 2>(W, row_bytes, K, xt, in.Mp, in.M, y, ldy, bias, n0, n1);
      case 3: return gemm_xt<B, 3>(W, row_bytes, K, xt, in.Mp, in.M, y, ldy, bias, n0, n1);
      default: return gemm_xt<B, 4>(W, row_bytes, K, xt, in.Mp, in.M, y, ldy, bias, n0, n1);
    }
  }
#elif QE_AVX2
  const float* x = in.x;
  if (in.xt) return gemm_xt<B>(W, row_bytes, K, in.xt, in.Mp, in.M, y, ldy, bias, n0, n1);
  if constexpr (std::is_same<B, Q5F>::value) return gemv_q5f(W, row_bytes, K, in.xf, in.M, in.xs, y, ldy, bias, n0, n1);
  if constexpr (std::is_same<B, Q6F>::value) return gemv_q6f(W, row_bytes, K, in.x, in.xf6, in.xs16, in.M, y, ldy, bias, n0, n1);
  if constexpr (std::is_same<B, Q4_K>::value)
    if (in.M == 1) {
      for (int64_t n = n0; n < n1; ++n) gemv1_q4k(W, row_bytes, K, x, in.xs, y, bias, n);
      return;
    }
  if constexpr (std::is_same<B, Q6_K>::value)
    if (in.M == 1) {
      for (int64_t n = n0; n < n1; ++n) gemv1_q6k(W, row_bytes, K, x, in.xs16, y, bias, n);
      return;
    }
  // K-quants at 2-8 rows. (Q4_K from 6 rows once took the generic decode below, 4-8 % faster than this kernel
  // over all of K; in chunks of K this one is 1.31-1.42x the generic decode at 6-8 rows, Zen 4, AVX2 build.)
  if constexpr (std::is_same<B, Q4_K>::value || std::is_same<B, Q6_K>::value)
    return gemvm_kq<B>(W, row_bytes, K, x, in.M, in.xs, y, ldy, bias, n0, n1);
#else
  const float* x = in.x;
  if (in.M > 3) return gemm_small<B>(W, row_bytes, K, x, in.M, y, ldy, bias, n0, n1);
#endif
  switch (in.M) {
    case 1: gemv_rows<B, 1>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 2: gemv_rows<B, 2>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 3: gemv_rows<B, 3>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
#if QE_AVX512 || QE_AVX2
    case 4: gemv_rows<B, 4>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 5: gemv_rows<B, 5>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 6: gemv_rows<B, 6>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    case 7: gemv_rows<B, 7>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
    default: gemv_rows<B, 8>(W, row_bytes, K, x, K, y, ldy, bias, n0, n1); break;
#endif
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
    case T_Q5_0_FIELDS: return Q5F::QK;
    case T_Q6_K_FIELDS: return Q6F::QK;
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
    case T_Q5_0_FIELDS: return Q5F::BYTES;
    case T_Q6_K_FIELDS: return Q6F::BYTES;
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
    case T_Q5_0_FIELDS: fn(Q5F{}); break;
    case T_Q6_K_FIELDS: fn(Q6F{}); break;
    case T_F32: fn(F32{}); break;
    case T_F16: fn(F16{}); break;
    case T_BF16: fn(BF16{}); break;
    default: TORCH_CHECK(false, "no kernel for GGUF type ", qtype);
  }
}

std::vector<Segment> segments_of(const std::vector<at::Tensor>& weights, const std::vector<int64_t>& qtypes,
                                 int64_t K) {
  TORCH_CHECK(!weights.empty() && weights.size() == qtypes.size(), "need one block type per weight segment");
  std::vector<Segment> segs;
  int64_t first = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t qk = block_values(qtypes[i]);
    TORCH_CHECK(qk > 0, "no kernel for GGUF type ", qtypes[i]);
    TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
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
at::Tensor scratch;
constexpr int64_t SCRATCH_FLOATS = int64_t(8) << 20;  // 32 MiB: a whole gate+up projection of a 0.5B model

// Prefill on AMX tiles where the machine has them (amx_linear.cpp); tests switch it off to compare.
bool amx_prefill = true;
// From this many rows of x the tiles beat the cache-tile GEMM (gemm_xt): their cost steps every 32 rows (a
// tile product takes 1-32 tokens alike, and a call's panel decode does not grow with the rows), the GEMM's
// grows with each row. Measured at 32 rows: Q5_0 layers 1.07-1.25x, Q8_0 (the LM head) 1.11x, Q4_K 0.99x; at
// 16 rows 0.65-0.77x. Q4_K crosses over at ~50 rows. bfloat16 weights need no scaling pass: at 16 rows
// 0.70x, but from 17 (where the GEMM takes two groups of 16 rows) 1.04-1.18x, at 32 1.4x (K 896, N 9728).
constexpr int64_t AMX_MIN_ROWS = 32, AMX_MIN_ROWS_Q4_K = 48, AMX_MIN_ROWS_BF16 = 17;

// The rows from which the tiles take these segments; 0: never.
int64_t amx_min_rows(const std::vector<Segment>& segs, int64_t K) {
  if (!amx_prefill || !qe_amx::tiles_granted() || K % 32) return 0;  // (bfloat16 rows may hold 16 x k values)
  std::vector<int64_t> qtypes;
  bool q4k = false, bf16 = true;
  for (const auto& s : segs) qtypes.push_back(s.qtype), q4k |= s.qtype == T_Q4_K, bf16 &= s.qtype == T_BF16;
  if (!qe_amx::supports(qtypes)) return 0;
  return bf16 ? AMX_MIN_ROWS_BF16 : q4k ? AMX_MIN_ROWS_Q4_K : AMX_MIN_ROWS;
}

// y = x @ W^T (+ bias) for M <= GEMV_ROWS_MAX rows of x: the register GEMVs (up to REG_ROWS rows) or the
// cache-tile GEMM over the transposed x (more rows).
void small_linear(const float* xp, int64_t M, int64_t K, const std::vector<Segment>& segs, int64_t N,
                  const float* bias_ptr, float* yp, const at::TensorOptions& options) {
  XForms in{xp, xp, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M,
            (M + XT_LANES - 1) / XT_LANES * XT_LANES};
  at::Tensor xq, xt, xtq, xs, xs16, xf, xf6;
#if QE_AVX512 || QE_AVX2
  bool any_q4k = false, any_q5f = false;
  for (const auto& s : segs) any_q4k |= s.qtype == T_Q4_K, any_q5f |= s.qtype == T_Q5_0_FIELDS;
  any_q5f &= M <= REG_ROWS;  // (more rows decode Q5F generically)
  if (any_q5f) {
    xf = at::empty({M, K}, options);
    fields_x<Q5F>(xp, M, K, xf.data_ptr<float>());
    in.xf = xf.data_ptr<float>();
  }
  if ((any_q4k && M <= REG_ROWS) || any_q5f) {  // AVX2 K-quant paths: up to 8 rows
    xs = at::empty({M, K / 32}, options);
    for (int64_t m = 0; m < M; ++m) sums32(xp + m * K, K, xs.data_ptr<float>() + m * (K / 32));
    in.xs = xs.data_ptr<float>();
  }
#if QE_AVX512
  at::Tensor xl, x8;
  if (any_q4k && !wide_vectors && M >= X8_ROWS && M <= REG_ROWS) {
    x8 = at::empty({M, K}, options);
    rows_by_8(xp, M, K, x8.data_ptr<float>());
    in.x8 = x8.data_ptr<float>();
  }
  if (any_q4k && M <= 2) {
    xl = at::empty({M, K}, options);
    for (int64_t m = 0; m < M; ++m) q4k_lanes_x(xp + m * K, K, xl.data_ptr<float>() + m * K);
    in.xl = xl.data_ptr<float>();
  }
#endif
  bool any_q6k = false, any_q6f = false;
  for (const auto& s : segs) any_q6k |= s.qtype == T_Q6_K, any_q6f |= s.qtype == T_Q6_K_FIELDS;
  if (any_q6f && (M == 1 || (M >= FIELDS_ROWS && M <= REG_ROWS))) {
    xf6 = at::empty({M, K}, options);
    fields_x<Q6F>(xp, M, K, xf6.data_ptr<float>());
    in.xf6 = xf6.data_ptr<float>();
  }
  if (M == 1 && (any_q6k || any_q6f)) {
    xs16 = at::empty({K / 16}, options);
    sums16(xp, K, xs16.data_ptr<float>());
    in.xs16 = xs16.data_ptr<float>();
  }
  if (M > REG_ROWS) {
    xt = at::empty({K, in.Mp}, options);
    transpose_x(xp, M, K, in.Mp, xt.data_ptr<float>());
    in.xt = xt.data_ptr<float>();
  }
#endif
#if QE_VBMI
  bool any_q5 = false;
  for (const auto& s : segs) any_q5 |= s.qtype == T_Q5_0;
  if (any_q5) {
    xq = at::empty({M, K}, options);
    permute_x(xp, M * K, xq.data_ptr<float>());
    in.xq = xq.data_ptr<float>();
    if (M > REG_ROWS) {
      xtq = at::empty({K, in.Mp}, options);
      transpose_x(in.xq, M, K, in.Mp, xtq.data_ptr<float>());
      in.xtq = xtq.data_ptr<float>();
    }
  }
#endif
  // Grain: enough rows per task that a thread streams a long stretch of the weights.
  at::parallel_for(0, N, 32, [&](int64_t r0, int64_t r1) {
    for_segments(segs, r0, r1, [&](const Segment& s, int64_t lo, int64_t hi) {
      with_block_type(s.qtype, [&](auto blk) {
        gemv<decltype(blk)>(s.data, s.row_bytes, K, in, yp + s.first, N, bias_ptr ? bias_ptr + s.first : nullptr,
                            lo, hi);
      });
    });
  });
}

// The pieces of rows of x that small_linear takes in turn. gemm_xt pays for rows in groups of 16 (a vector of the
// transposed x), so 9 rows cost as much as 16 and 17 as much as 32; where that is dearer than the GEMVs of the
// rows left over, those go to the GEMVs. Zen 4, the demo model's layers (benchmarks/kernels.py, ms a call):
// gate+up 8 rows 0.92, 1-4 rows 0.23-0.51, 16 rows 1.66, 17-32 rows 2.87-3.07; the LM head 14.0, 3.6-7.5, 28.7,
// 46.2-46.7; Q6F down 0.67, 0.12-0.36, 0.94, 1.63-1.95. (AVX2's gemm_xt takes rows 8 at a time: not split.)
std::vector<std::pair<int64_t, int64_t>> row_pieces(int64_t M) {
  if (!QE_AVX512 || M <= REG_ROWS || M % 16 == 0) return {{0, M}};
  if (M < 16) return M <= 12 ? std::vector<std::pair<int64_t, int64_t>>{{0, REG_ROWS}, {REG_ROWS, M - REG_ROWS}}
                             : std::vector<std::pair<int64_t, int64_t>>{{0, M}};
  const int64_t tail = M % 16;
  if (tail > REG_ROWS) return {{0, M}};
  return {{0, M - tail}, {M - tail, tail}};
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                  const std::vector<int64_t>& qtypes, const c10::optional<at::Tensor>& bias,
                  int64_t gemv_max_rows) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be CPU float32 [M, K]");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const auto segs = segments_of(weights, qtypes, K);
  const int64_t N = segs.back().first + segs.back().rows;
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be contiguous float32 with one value per output row");
    bias_ptr = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (const int64_t from = amx_min_rows(segs, K); from > 0 && M >= from) {
    std::vector<qe_amx::Part> parts;
    for (const auto& s : segs) parts.push_back({s.data, s.qtype, s.rows, s.row_bytes, s.first});
    qe_amx::linear(xp, M, K, parts, N, bias_ptr, yp);
    return y;
  }
  if (M <= std::min(gemv_max_rows, GEMV_ROWS_MAX)) {
    for (const auto& [m0, rows] : row_pieces(M))
      small_linear(xp + m0 * K, rows, K, segs, N, bias_ptr, yp + m0 * N, xc.options());
    return y;
  }
  std::lock_guard<std::mutex> lock(scratch_mutex);
  // Equal tiles (a last sliver would be a poor GEMM); each product writes its columns of y in place (BLAS takes
  // the row stride), so no tile is copied.
  const int64_t tiles = (N * K + SCRATCH_FLOATS - 1) / SCRATCH_FLOATS;
  const int64_t tile = (N + tiles - 1) / tiles;
  if (!scratch.defined() || scratch.numel() < tile * K) scratch = at::empty({tile * K}, xc.options());
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

at::Tensor dequantize(const at::Tensor& weight, int64_t qtype, int64_t K) {
  const auto segs = segments_of({weight}, {qtype}, K);
  auto out = at::empty({weight.size(0), K}, at::dtype(at::kFloat));
  dequant_rows_into(segs, K, 0, weight.size(0), out.data_ptr<float>());
  return out;
}

at::Tensor dequantize_rows(const at::Tensor& weight, int64_t qtype, int64_t K, const at::Tensor& ids) {
  const auto segs = segments_of({weight}, {qtype}, K);
  TORCH_CHECK(ids.dtype() == at::kLong && ids.dim() == 1, "ids must be int64 [n]");
  const auto idc = ids.contiguous();
  const int64_t n = idc.size(0), rows = weight.size(0);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < rows, "row ", id[i], " out of range 0..", rows - 1);
  auto out = at::empty({n, K}, at::dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const Segment& s = segs[0];
  with_block_type(qtype, [&](auto blk) {
    for (int64_t i = 0; i < n; ++i) dequant_row<decltype(blk)>(s.data + id[i] * s.row_bytes, K, o + i * K);
  });
  return out;
}

// Q5_0 rows re-encoded as Q8_0 rows: the same scale bytes, each value q - 16 as an int8, so every dequantised
// value is the same float32 (d * (q - 16) either way). Where the Q5_0 decode is the slower one (AVX2: ~1.4x
// the time of Q8_0's per value), a load may trade ~55 % more bytes for the Q8_0 kernels.
at::Tensor q5_0_as_q8_0(const at::Tensor& weight, int64_t K) {
  const auto segs = segments_of({weight}, {T_Q5_0}, K);
  const int64_t rows = weight.size(0), nb = K / 32;
  auto out = at::empty({rows, nb * Q8_0::BYTES}, at::dtype(at::kByte));
  const uint8_t* src = segs[0].data;
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows * nb, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* in = src + b * Q5_0::BYTES;
      uint8_t* o = dst + b * Q8_0::BYTES;
      o[0] = in[0], o[1] = in[1];
      const uint32_t qh = u32(in + 2);
      for (int j = 0; j < 16; ++j) {
        const int lo = (in[6 + j] & 15) | (((qh >> j) & 1) << 4), hi = (in[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        o[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(lo - 16));
        o[18 + j] = static_cast<uint8_t>(static_cast<int8_t>(hi - 16));
      }
    }
  });
  return out;
}

// Q5_0 rows re-laid as Q5F rows (quant_blocks.h): each four blocks' values q (0..31) moved into 5-bit fields and
// their scales copied, so every dequantised value is the same float32 (d * (q - 16)). K: a multiple of 128.
at::Tensor q5_0_as_fields(const at::Tensor& weight, int64_t K) {
  TORCH_CHECK(K % Q5F::QK == 0, "Q5_0 rows of ", K, " values cannot be re-laid in groups of ", Q5F::QK);
  const auto segs = segments_of({weight}, {T_Q5_0}, K);
  const int64_t groups = weight.size(0) * (K / Q5F::QK);
  auto out = at::empty({weight.size(0), K / Q5F::QK * Q5F::BYTES}, at::dtype(at::kByte));
  const uint8_t* src = segs[0].data;
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1024, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* o = dst + g * Q5F::BYTES;
      // The 128 values first, then into their fields: two loops the compiler vectorises (one value at a time
      // into its field took 0.3 s of the demo model's load).
      uint32_t q[128], lanes[24] = {};
      for (int blk = 0; blk < 4; ++blk) {
        const uint8_t* in = src + (4 * g + blk) * Q5_0::BYTES;
        o[96 + 2 * blk] = in[0], o[97 + 2 * blk] = in[1];
        const uint32_t qh = u32(in + 2);
        for (int j = 0; j < 16; ++j) {  // values j and j + 16: the nibbles of byte j, fifth bits j and j + 16 of qh
          q[32 * blk + j] = (in[6 + j] & 15u) | (((qh >> j) & 1u) << 4);
          q[32 * blk + j + 16] = (in[6 + j] >> 4) | (((qh >> (j + 16)) & 1u) << 4);
        }
      }
      for (int v = 0; v < 16; ++v)
        for (int j = 0; j < 8; ++j) lanes[8 * Q5F::group(v) + j] |= q[8 * v + j] << Q5F::shift(v);
      std::memcpy(o, lanes, sizeof(lanes));  // little-endian lanes, as the kernels load them
    }
  });
  return out;
}

// Q6_K rows re-laid as Q6F rows (quant_blocks.h), block by block: the 6-bit values moved into fields, the
// scales and d copied, so every dequantised value is the same float32.
at::Tensor q6_k_as_fields(const at::Tensor& weight, int64_t K) {
  const auto segs = segments_of({weight}, {T_Q6_K}, K);
  const int64_t blocks = weight.size(0) * (K / Q6F::QK);
  auto out = at::empty({weight.size(0), K / Q6F::QK * Q6F::BYTES}, at::dtype(at::kByte));
  const uint8_t* src = segs[0].data;
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t *in = src + b * Q6_K::BYTES, *ql = in, *qh = in + 128;
      uint8_t* o = dst + b * Q6F::BYTES;
      uint32_t q[256], lanes[48] = {};
      for (int e = 0; e < 256; ++e) {  // Q6_K's packing (Q6_K::scalar)
        const int h = e / 128, t = (e % 128) / 32, l = e % 32;
        const uint32_t lowbyte = ql[64 * h + 32 * (t & 1) + l];
        q[e] = (t < 2 ? lowbyte & 15u : lowbyte >> 4) | (((qh[32 * h + l] >> (2 * t)) & 3u) << 4);
      }
      for (int v = 0; v < 30; ++v)
        for (int i = 0; i < 8; ++i) lanes[8 * Q6F::group(v) + i] |= q[8 * v + i] << Q6F::shift(v);
      for (int p = 0; p < 3; ++p)
        for (int i = 0; i < 8; ++i) {
          lanes[8 * p + i] |= ((q[240 + i] >> (2 * p)) & 3u) << 30;
          lanes[8 * (3 + p) + i] |= ((q[248 + i] >> (2 * p)) & 3u) << 30;
        }
      std::memcpy(o, lanes, sizeof(lanes));
      std::memcpy(o + 192, in + 192, 18);  // scales and d
    }
  });
  return out;
}

// Whether loads should re-lay Q5_0 weights in fields (Q5_0_FIELDS, or Q8_0 for rows not a multiple of 128)
// and Q6_K weights in fields (Q6_K_FIELDS): where this build's products on the file's layouts are the slower
// ones. AVX2 builds (Zen 3: Q5_0 through a table, 1.2x slower than Q5_0_FIELDS) and AVX-512 builds on AMD CPUs
// (Zen 4: 512-bit operations in two halves; the 16-lane Q5_0 decode, one permute per 16 values, ran gate+up
// 1.12x slower than the 8-lane fields, the one-row Q6_K product 1.45x slower than Q6F's). AVX-512 on Intel keeps
// the file's layouts (not measured there).
bool prefers_fields() {
#if QE_AVX512
  return __builtin_cpu_is("amd");
#else
  return QE_AVX2;
#endif
}

bool has_avx512() { return QE_AVX512; }

bool set_wide_vectors(bool on) {
#if QE_AVX512
  const bool was = wide_vectors;
  wide_vectors = on;
  return was;
#else
  (void)on;
  return false;
#endif
}

bool amx_prefill_available() { return qe_amx::tiles_granted() && qe_amx::supports({T_Q8_0}); }

bool set_amx_prefill(bool on) {
  const bool was = amx_prefill;
  amx_prefill = on;
  return was;
}
