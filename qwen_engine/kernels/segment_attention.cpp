// The vision towers' attention with low-precision products: each query row attends to the keys of its own
// segment (an image, a video frame or a window), softmax(scale · q·K^T) · V, in one of two arithmetics:
//   bf16:  q·k and p·v are sums of bf16 products kept in float32 (AVX512-BF16 vdpbf16ps: twice float32's
//          multiply-adds a cycle), the softmax float32, the weights p rounded to bf16 before they meet V — the
//          arithmetic of PyTorch's bf16 flash attention on the CPU, with the sums in another order (torch's own
//          runs at float32's speed here). Bf16 towers, and float32 ones on request (lossy).
//   int8 scores: as bf16, but q·k in integers (AVX-512 VNNI vpdpbusd, twice vdpbf16ps's multiply-adds): each
//          query row and each key (less its segment's mean key, which shifts a row's scores by one constant and
//          so leaves the softmax as it was) rounded to int8 with a scale of its own. The w8a8-vision mode.
//
// Q, K and V are packed first (from float32 or bf16), per head, keys padded to blocks of KB with zeros; a word
// is 4 bytes, two bf16 values or four int8 ones:
//   queries: [head][row][D / per-word] words;
//   keys:    [head][block of KB keys][word e][KB] words, a word holding dims of one key, so one instruction adds
//            the products of one word of dims for 16 keys against the query's word, broadcast;
//   values:  [head][pair of keys][Dp] words (Dp: D rounded up to 16), a word holding two keys' values of one
//            dim, so one vdpbf16ps adds p_j v_j + p_j+1 v_j+1 for 16 dims against the weights' pair, broadcast.
// A task is TILE query rows of one (head, segment); each block of keys and values (16 KiB at D = 64) serves
// them all while it sits in L1, R rows at a time, with a running softmax (base 2) as in prefill_attention.cpp.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QE_SEGMENT_ATTENTION 1
#else
#define QE_SEGMENT_ATTENTION 0
#endif

#if QE_SEGMENT_ATTENTION
namespace {

constexpr int KB = 64;    // keys per block: 4 vectors of scores per query row
constexpr int TILE = 32;  // query rows per task: their state (32 x Dp floats) stays in L1 beside a block

using Word = uint32_t;
using bf16 = c10::BFloat16;

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

inline __m512i load_words(const Word* p) { return _mm512_loadu_si512(p); }

// 2^x for the scores less their running maximum (x ≤ 0, in base 2): 2^n · 2^f with n = round(x) and |f| ≤ 1/2,
// 2^f by a degree-5 polynomial fitted for relative error (2.4e-7 in float32 arithmetic, near exp512's; the
// weights are rounded to bf16 next). Below -126 it returns 2^-126: a padding key's weight, ~0.
inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(0.0013276460813358426f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.009675540961325169f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.05550713464617729f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.24022120237350464f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931469440460205f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(y, n);
}

// One call's packed operands, for one head at a time (see the top of the file).
struct Operands {
  const Word* queries;        // [H][N][words]
  const float* query_scales;  // int8: [H][N], each row's scale times the softmax's (with log2 e); bf16: unused
  const int32_t* query_sums;  // int8: [H][N], 128 · Σ q (the keys are stored + 128; this takes it off)
  const Word* keys;           // [H][packed / KB][words][KB]
  const float* key_scales;    // int8: [H][packed]
  const Word* values;         // [H][packed / 2][Dp]
  int words;                  // per query row and key: D / 2 (bf16) or D / 4 (int8)
  float scale;                // bf16: the softmax's scale with log2 e
};

// The sums behind RR query rows' scores over one block of keys kb: for each word of the rows' dims, 16 keys a
// vector against the row's word, broadcast. Acc: __m512i with vpdpbusd (int8 scores) or __m512 with vdpbf16ps.
template <int RR, class Acc, class Dot>
inline void score_sums(const Word* const* q, int words, const Word* kb, Acc (&a)[RR][4], Dot dot) {
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) a[r][c] = Acc{};
  for (int e = 0; e < words; ++e) {
    const Word* ke = kb + e * KB;
    const __m512i k0 = load_words(ke), k1 = load_words(ke + 16), k2 = load_words(ke + 32), k3 = load_words(ke + 48);
    #pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const __m512i qe = _mm512_set1_epi32(static_cast<int>(q[r][e]));
      a[r][0] = dot(a[r][0], k0, qe);
      a[r][1] = dot(a[r][1], k1, qe);
      a[r][2] = dot(a[r][2], k2, qe);
      a[r][3] = dot(a[r][3], k3, qe);
    }
  }
}

// RR query rows (q[r], their words; int8: qs, qsum their scales and sums) against one block: keys kb, key scales
// ks (int8), values vb ([KB/2][16 V] words), of which the first nk (1..KB) are real. m, l: the rows' running max
// and sum (base 2); o[r]: their 16 V outputs so far. p: RR x KB bf16 of workspace. The loops over rows and
// vectors are unrolled so the sums stay in registers.
template <int V, int RR, bool INT8>
inline void block_rows(const Operands& op, const Word* const* q, const float* qs, const int32_t* qsum, const Word* kb,
                       const float* ks, const Word* vb, int nk, float* m, float* l, float* const* o, bf16* p) {
  __m512 s[RR][4];
  if constexpr (INT8) {
    __m512i a[RR][4];
    const auto dot = [](__m512i acc, __m512i k, __m512i qe) { return dpbusd(acc, k, qe); };
    score_sums<RR>(q, op.words, kb, a, dot);
    #pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const __m512i sum = _mm512_set1_epi32(qsum[r]);
      const __m512 sq = _mm512_set1_ps(qs[r]);
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c)
        s[r][c] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r][c], sum)),
                                              _mm512_loadu_ps(ks + 16 * c)), sq);
    }
  } else {
    score_sums<RR>(q, op.words, kb, s, [](__m512 acc, __m512i k, __m512i qe) { return dot_pairs(acc, k, qe); });
    const __m512 sv = _mm512_set1_ps(op.scale);
    #pragma GCC unroll 8
    for (int r = 0; r < RR; ++r)
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_mul_ps(s[r][c], sv);
  }
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float m_old[16] = {}, m_new[16] = {}, alpha[16];
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
    __m512 top = ninf;
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {  // -inf for the padding keys of a segment's last block
      if (nk < KB) s[r][c] = vfirst(s[r][c], std::clamp(nk - 16 * c, 0, 16), ninf);
      top = _mm512_max_ps(top, s[r][c]);
    }
    m_old[r] = m[r];
    m_new[r] = std::max(m_old[r], _mm512_reduce_max_ps(top));
  }
  // 2^(m_old - m_new) for all rows at once (~0 for the first block's -inf)
  _mm512_store_ps(alpha, exp2_nonpositive(_mm512_sub_ps(_mm512_load_ps(m_old), _mm512_load_ps(m_new))));
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
    const __m512 mr = _mm512_set1_ps(m_new[r]);
    __m512 sum = _mm512_setzero_ps();
    __m512 e[4];
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      e[c] = exp2_nonpositive(_mm512_sub_ps(s[r][c], mr));
      sum = _mm512_add_ps(sum, e[c]);
    }
    // The weights in key order, rounded to bf16 (the second operand's 16 values come first).
    _mm512_storeu_si512(p + r * KB, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[1], e[0])));
    _mm512_storeu_si512(p + r * KB + 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[3], e[2])));
    m[r] = m_new[r];
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
  }
  __m512 acc[RR][V];
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    #pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * v), a);
  }
  for (int j = 0; j < (nk + 1) / 2; ++j) {  // a padding key's weight is ~0 and its values are 0
    const Word* vj = vb + j * 16 * V;
    __m512i vv[V];
    #pragma GCC unroll 8
    for (int v = 0; v < V; ++v) vv[v] = load_words(vj + 16 * v);
    #pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      Word pair;
      std::memcpy(&pair, p + r * KB + 2 * j, sizeof pair);
      const __m512i pj = _mm512_set1_epi32(static_cast<int>(pair));
      #pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = dot_pairs(acc[r][v], vv[v], pj);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(o[r] + 16 * v, acc[r][v]);
}

template <int V>
constexpr int rows_together() { return V <= 6 ? 4 : 2; }  // RR x V sums, V values and a broadcast in 32 registers

template <int V, bool INT8, int RR = rows_together<V>()>
inline void any_rows(int count, const Operands& op, const Word* const* q, const float* qs, const int32_t* qsum,
                     const Word* kb, const float* ks, const Word* vb, int nk, float* m, float* l, float* const* o,
                     bf16* p) {
  if constexpr (RR > 1) {
    if (count < RR) return any_rows<V, INT8, RR - 1>(count, op, q, qs, qsum, kb, ks, vb, nk, m, l, o, p);
  }
  block_rows<V, RR, INT8>(op, q, qs, qsum, kb, ks, vb, nk, m, l, o, p);
}

struct Segment {
  int64_t start, length, packed;  // first row, rows, first key's place in the packed layouts (a multiple of KB)
};

template <int V, bool INT8>
void attend(const Operands& op, const std::vector<Segment>& segments, int64_t N, int64_t packed, int64_t H,
            int64_t D, const at::Tensor& out) {
  constexpr int Dp = 16 * V, R = rows_together<V>();
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (segment, first row in it)
  for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s)
    for (int64_t r = 0; r < segments[s].length; r += TILE) tiles.emplace_back(s, r);
  const int64_t count = static_cast<int64_t>(tiles.size());
  const bool to_bf16 = out.scalar_type() == at::kBFloat16;
  char* outp = static_cast<char*>(out.data_ptr());
  const int64_t element = out.element_size();
  at::parallel_for(0, count * H, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float m[TILE], l[TILE], o[TILE * Dp];
    alignas(64) bf16 p[R * KB];
    for (int64_t t = t0; t < t1; ++t) {
      // Head-major: a thread's consecutive tasks share a head's keys and values, which then stay in L2.
      const int64_t h = t / count;
      const Segment& seg = segments[tiles[t % count].first];
      const int64_t first = seg.start + tiles[t % count].second;
      const int64_t rows = std::min<int64_t>(TILE, seg.start + seg.length - first);
      std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
      std::fill(l, l + rows, 0.0f);
      std::fill(o, o + rows * Dp, 0.0f);
      const Word* qrow[TILE];
      float* orow[TILE];
      for (int64_t x = 0; x < rows; ++x) {
        qrow[x] = op.queries + (h * N + first + x) * op.words;
        orow[x] = o + x * Dp;
      }
      const float* qs = INT8 ? op.query_scales + h * N + first : nullptr;
      const int32_t* qsum = INT8 ? op.query_sums + h * N + first : nullptr;
      for (int64_t b = 0; b < seg.length; b += KB) {
        const int64_t key = h * packed + seg.packed + b;
        const Word* kb = op.keys + key * op.words;
        const float* ks = INT8 ? op.key_scales + key : nullptr;
        const Word* vb = op.values + key / 2 * Dp;
        const int nk = static_cast<int>(std::min<int64_t>(KB, seg.length - b));
        for (int64_t x = 0; x < rows; x += R)
          any_rows<V, INT8>(static_cast<int>(std::min<int64_t>(R, rows - x)), op, qrow + x,
                            INT8 ? qs + x : nullptr, INT8 ? qsum + x : nullptr, kb, ks, vb, nk, m + x, l + x,
                            orow + x, p);
      }
      for (int64_t x = 0; x < rows; ++x) {
        const float inv = 1.0f / l[x];
        char* dst = outp + ((first + x) * H + h) * D * element;
        for (int64_t d = 0; d < D; ++d) {
          const float y = o[x * Dp + d] * inv;
          if (to_bf16)
            reinterpret_cast<bf16*>(dst)[d] = bf16(y);
          else
            reinterpret_cast<float*>(dst)[d] = y;
        }
      }
    }
  });
}

// Packing reads rows of q, k and v 16 values at a time (float32 or bf16), the last vector masked.
inline __mmask16 first16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1); }
inline __m512 load16(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
inline __m512 load16(const bf16* x, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x)), 16));
}

// 16 floats → their bf16 bits (in the low half of each 32-bit lane), rounded to nearest even exactly as
// c10::BFloat16(float) rounds, NaN as 0x7fc0.
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

// n values (at x, less `minus` if given) → int8 in dst (n a multiple of 4) with max |x| / 127 as scale (returned;
// 0 for a row of zeros), rounded half to even (vcvtps2dq in the default rounding mode); `offset` is added to
// each (128: the unsigned operand of vpdpbusd); *sum (if given): the sum of the int8 values.
template <class T>
float to_int8(const T* x, const float* minus, int64_t n, int offset, uint8_t* dst, int32_t* sum) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = first16(n - d);
    __m512 v = load16(x + d, m);
    if (minus) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, minus + d));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  const float top = _mm512_reduce_max_ps(amax);
  const float scale = top / 127.0f, inv = top > 0.0f ? 127.0f / top : 0.0f;
  __m512i total = _mm512_setzero_si512();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = first16(n - d);
    __m512 v = load16(x + d, m);
    if (minus) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, minus + d));
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));  // 0 in the masked lanes
    total = _mm512_add_epi32(total, q);
    _mm512_mask_cvtepi32_storeu_epi8(dst + d, m, _mm512_add_epi32(q, _mm512_set1_epi32(offset)));
  }
  if (sum) *sum = _mm512_reduce_add_epi32(total);
  return scale;
}

// n values → bf16 in dst (as c10::BFloat16 rounds).
template <class T>
void to_bf16(const T* x, int64_t n, uint16_t* dst) {
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = first16(n - d);
    _mm512_mask_cvtepi32_storeu_epi16(dst + d, m, bf16_bits(load16(x + d, m)));
  }
}

template <class T>
void pack_and_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<Segment>& segments, int64_t packed, float scale, bool int8_scores,
                     const at::Tensor& out) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Dp = (D + 15) / 16 * 16;
  const int words = static_cast<int>(int8_scores ? D / 4 : D / 2);
  const T *qd = q.data_ptr<T>(), *kd = k.data_ptr<T>(), *vd = v.data_ptr<T>();
  const auto i32 = at::dtype(at::kInt), f32 = at::dtype(at::kFloat);
  auto queries = at::empty({H * N * words}, i32), keys = at::empty({H * packed * words}, i32);
  auto values = at::empty({H * packed / 2 * Dp}, i32);
  auto query_scales = at::empty({int8_scores ? H * N : 0}, f32), key_scales = at::empty({int8_scores ? H * packed : 0}, f32);
  auto query_sums = at::empty({int8_scores ? H * N : 0}, i32);
  Word* qp = reinterpret_cast<Word*>(queries.data_ptr<int32_t>());
  Word* kp = reinterpret_cast<Word*>(keys.data_ptr<int32_t>());
  Word* vp = reinterpret_cast<Word*>(values.data_ptr<int32_t>());
  float *qsp = query_scales.data_ptr<float>(), *ksp = key_scales.data_ptr<float>();
  int32_t* qsum = query_sums.data_ptr<int32_t>();
  const float log2_scale = static_cast<float>(scale * 1.4426950408889634);  // the softmax runs in base 2

  at::parallel_for(0, N * H, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / H, h = i % H;
      const T* x = qd + n * q.stride(0) + h * q.stride(1);
      Word* dst = qp + (h * N + n) * words;
      if (int8_scores) {
        qsp[h * N + n] = to_int8(x, nullptr, D, 0, reinterpret_cast<uint8_t*>(dst), &qsum[h * N + n]) * log2_scale;
        qsum[h * N + n] *= 128;
      } else {
        to_bf16(x, D, reinterpret_cast<uint16_t*>(dst));
      }
    }
  });
  // int8: each segment's mean key, per head, taken off its keys before they are rounded.
  std::vector<float> means(int8_scores ? segments.size() * H * D : 0);
  if (int8_scores) {
    at::parallel_for(0, static_cast<int64_t>(segments.size()) * H, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Segment& seg = segments[i / H];
        const int64_t h = i % H;
        std::vector<double> total((D + 15) / 16 * 16, 0.0);
        for (int64_t j = 0; j < seg.length; ++j) {
          const T* x = kd + (seg.start + j) * k.stride(0) + h * k.stride(1);
          for (int64_t d = 0; d < D; d += 16) {  // in float64, key by key, as a scalar loop would add them
            const __m512 v = load16(x + d, first16(D - d));
            double* t = total.data() + d;
            _mm512_storeu_pd(t, _mm512_add_pd(_mm512_loadu_pd(t), _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
            _mm512_storeu_pd(t + 8, _mm512_add_pd(_mm512_loadu_pd(t + 8),
                                                  _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))));
          }
        }
        for (int64_t d = 0; d < D; ++d) means[i * D + d] = static_cast<float>(total[d] / seg.length);
      }
    });
  }
  // A block of KB keys of one (head, segment) per step: its keys, and its values in pairs of keys.
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (segment, first key)
  for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s)
    for (int64_t b = 0; b < segments[s].length; b += KB) blocks.emplace_back(s, b);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()) * H, 16, [&](int64_t t0, int64_t t1) {
    alignas(64) uint8_t row[4 * 128];  // a key's words (int8: 128 bytes at most; bf16: 256)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t % H, si = blocks[t / H].first;
      const Segment& seg = segments[si];
      const int64_t b = blocks[t / H].second, n = std::min<int64_t>(KB, seg.length - b);
      const int64_t key = h * packed + seg.packed + b;
      Word* kb = kp + key * words;
      Word* vb = vp + key / 2 * Dp;
      std::fill(kb, kb + KB * words, int8_scores ? Word{0x80808080u} : Word{0});  // int8: 0 stored as 128
      std::fill(vb, vb + KB / 2 * Dp, Word{0});
      if (int8_scores) std::fill(ksp + key, ksp + key + KB, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = kd + (seg.start + b + j) * k.stride(0) + h * k.stride(1);
        if (int8_scores) {
          ksp[key + j] = to_int8(kr, means.data() + (si * H + h) * D, D, 128, row, nullptr);
          for (int e = 0; e < words; ++e) std::memcpy(&kb[e * KB + j], row + 4 * e, 4);
        } else {
          to_bf16(kr, D, reinterpret_cast<uint16_t*>(row));
          for (int e = 0; e < words; ++e) std::memcpy(&kb[e * KB + j], row + 4 * e, 4);
        }
      }
      // Values: keys j and j + 1 of a pair in the low and high halves of each word.
      for (int64_t j = 0; j < n; j += 2) {
        const T* v0 = vd + (seg.start + b + j) * v.stride(0) + h * v.stride(1);
        const T* v1 = j + 1 < n ? v0 + v.stride(0) : nullptr;
        Word* vw = vb + j / 2 * Dp;
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 m = first16(D - d);
          __m512i word = bf16_bits(load16(v0 + d, m));
          if (v1) word = _mm512_or_si512(word, _mm512_slli_epi32(bf16_bits(load16(v1 + d, m)), 16));
          _mm512_mask_storeu_epi32(vw + d, m, word);
        }
      }
    }
  });
  const Operands op{qp, qsp, qsum, kp, ksp, vp, words, log2_scale};
  const auto run = [&](auto v_tag) {
    constexpr int VV = decltype(v_tag)::value;
    if (int8_scores)
      attend<VV, true>(op, segments, N, packed, H, D, out);
    else
      attend<VV, false>(op, segments, N, packed, H, D, out);
  };
  switch (Dp / 16) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace
#endif

bool segment_attention_supports(int64_t head_dim, bool int8_scores) {
#if QE_SEGMENT_ATTENTION
  return head_dim % (int8_scores ? 4 : 2) == 0 && head_dim >= 2 && head_dim <= 128;
#else
  (void)head_dim, (void)int8_scores;
  return false;
#endif
}

// q, k, v float32 or bfloat16 (one dtype) [N, H, D] (rows may be strided, e.g. views of a fused qkv output; each
// head's D values contiguous); cu_seqlens int32/int64 [segments + 1] from 0 to N. int8_scores: q·k in int8 (see
// the top of the file), else bf16. Returns [N, H, D], float32 or bfloat16 (rounded once, from the float32 result).
at::Tensor segment_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, double scale, bool int8_scores, bool out_float32) {
  TORCH_CHECK(q.dim() == 3 && segment_attention_supports(q.size(2), int8_scores),
              "segment_attention: no kernel for this head size in this build");
  TORCH_CHECK((q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && q.device().is_cpu(),
              "q, k and v must be float32 or bfloat16 (one of them) on the CPU");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes() && q.stride(2) == 1 && k.stride(2) == 1 &&
                  v.stride(2) == 1, "q, k, v [N, H, D] of one shape, each head's values contiguous");
  const auto cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "cu_seqlens [segments + 1]");
  const int64_t* cp = cu.data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[cu.size(0) - 1] == N, "cu_seqlens must run from 0 to ", N);
  auto out = at::empty({N, H, D}, q.options().dtype(out_float32 ? at::kFloat : at::kBFloat16));
#if QE_SEGMENT_ATTENTION
  std::vector<Segment> segments;
  int64_t packed = 0;
  for (int64_t s = 0; s + 1 < cu.size(0); ++s) {
    TORCH_CHECK(cp[s + 1] >= cp[s], "cu_seqlens must not decrease");
    if (cp[s + 1] == cp[s]) continue;
    segments.push_back({cp[s], cp[s + 1] - cp[s], packed});
    packed += (cp[s + 1] - cp[s] + KB - 1) / KB * KB;
  }
  const float fs = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16)
    pack_and_attend<bf16>(q, k, v, segments, packed, fs, int8_scores, out);
  else
    pack_and_attend<float>(q, k, v, segments, packed, fs, int8_scores, out);
#else
  (void)scale;
#endif
  return out;
}
