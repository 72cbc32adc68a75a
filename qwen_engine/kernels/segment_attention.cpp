// The vision towers' attention with bfloat16 products: each query row attends to the keys of its own segment
// (an image, a video frame or a window), softmax(scale · q·K^T) · V, where q·k and p·v are sums of bf16 products
// kept in float32 (AVX512-BF16 vdpbf16ps: twice float32's multiply-adds a cycle), the softmax is float32, and
// the weights p are rounded to bf16 before their product with V. That is the arithmetic of PyTorch's bf16
// flash attention on the CPU, with the sums in another order; torch's own runs at float32's speed here.
//
// K and V of every (head, segment) are packed first, keys padded to blocks of KB with zeros:
//   keys:   [head][block of KB keys][pair of dims e][KB] words, a word holding (k_2e, k_2e+1) of one key, so one
//           vdpbf16ps adds q_2e k_2e + q_2e+1 k_2e+1 for 16 keys against q's pair, broadcast;
//   values: [head][pair of keys][Dp] words (Dp: D rounded up to 16), a word holding two keys' values of one
//           dim, so one vdpbf16ps adds p_j v_j + p_j+1 v_j+1 for 16 dims against the weights' pair, broadcast.
// A task is TILE query rows of one (head, segment); each block of keys and values (16 KiB at D = 64) serves
// them all while it sits in L1, R rows at a time, with a running softmax as in prefill_attention.cpp.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define QE_SEGMENT_BF16 1
#else
#define QE_SEGMENT_BF16 0
#endif

#if QE_SEGMENT_BF16
namespace {

constexpr int KB = 64;    // keys per block: 4 vectors of scores per query row
constexpr int TILE = 32;  // query rows per task: their state (32 x Dp floats) stays in L1 beside a block

using Word = uint32_t;  // two bf16 values

inline Word word_at(const c10::BFloat16* p) {  // two adjacent bf16 values, wherever they are aligned
  Word w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

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

// RR query rows (q[r]: D bf16) against one block: keys kb ([D/2][KB] words), values vb ([KB/2][16 V] words),
// of which the first nk (1..KB) are real; scale includes log2(e) (the softmax runs in base 2). m, l: the rows'
// running max and sum; o[r]: their 16 V outputs so far.
// p: RR x KB bf16 of workspace. The loops over rows and vectors are unrolled so the sums stay in registers.
template <int V, int RR>
inline void block_rows(const c10::BFloat16* const* q, int pairs, const Word* kb, const Word* vb, int nk, float scale,
                       float* m, float* l, float* const* o, c10::BFloat16* p) {
  __m512 s[RR][4];
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
  for (int e = 0; e < pairs; ++e) {
    const Word* ke = kb + e * KB;
    const __m512i k0 = load_words(ke), k1 = load_words(ke + 16), k2 = load_words(ke + 32), k3 = load_words(ke + 48);
    #pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const __m512i qe = _mm512_set1_epi32(static_cast<int>(word_at(q[r] + 2 * e)));
      s[r][0] = dot_pairs(s[r][0], k0, qe);
      s[r][1] = dot_pairs(s[r][1], k1, qe);
      s[r][2] = dot_pairs(s[r][2], k2, qe);
      s[r][3] = dot_pairs(s[r][3], k3, qe);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float m_old[16] = {}, m_new[16] = {}, alpha[16];
  #pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) {
    __m512 top = ninf;
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {  // scaled scores; -inf for the padding keys of a segment's last block
      s[r][c] = _mm512_mul_ps(s[r][c], sv);
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
      const __m512i pj = _mm512_set1_epi32(static_cast<int>(word_at(p + r * KB + 2 * j)));
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

template <int V, int RR = rows_together<V>()>
inline void any_rows(int count, const c10::BFloat16* const* q, int pairs, const Word* kb, const Word* vb, int nk,
                     float scale, float* m, float* l, float* const* o, c10::BFloat16* p) {
  if constexpr (RR > 1) {
    if (count < RR) return any_rows<V, RR - 1>(count, q, pairs, kb, vb, nk, scale, m, l, o, p);
  }
  block_rows<V, RR>(q, pairs, kb, vb, nk, scale, m, l, o, p);
}

struct Segment {
  int64_t start, length, packed;  // first row, rows, first key's place in the packed layouts (a multiple of KB)
};

template <int V>
void attend(const c10::BFloat16* q, int64_t qs0, int64_t qs1, const Word* keys, const Word* values,
            const std::vector<Segment>& segments, int64_t packed, int64_t H, int64_t D, float scale,
            const torch::Tensor& out) {
  constexpr int Dp = 16 * V, R = rows_together<V>();
  const int pairs = static_cast<int>(D / 2);
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (segment, first row in it)
  for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s)
    for (int64_t r = 0; r < segments[s].length; r += TILE) tiles.emplace_back(s, r);
  const int64_t count = static_cast<int64_t>(tiles.size());
  const bool to_bf16 = out.scalar_type() == torch::kBFloat16;
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t element = out.element_size();
  at::parallel_for(0, count * H, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float m[TILE], l[TILE], o[TILE * Dp];
    alignas(64) c10::BFloat16 p[R * KB];
    for (int64_t t = t0; t < t1; ++t) {
      // Head-major: a thread's consecutive tasks share a head's keys and values, which then stay in L2.
      const int64_t h = t / count;
      const Segment& seg = segments[tiles[t % count].first];
      const int64_t first = tiles[t % count].second, rows = std::min<int64_t>(TILE, seg.length - first);
      std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
      std::fill(l, l + rows, 0.0f);
      std::fill(o, o + rows * Dp, 0.0f);
      const c10::BFloat16* qrow[TILE];
      float* orow[TILE];
      for (int64_t x = 0; x < rows; ++x) {
        qrow[x] = q + (seg.start + first + x) * qs0 + h * qs1;
        orow[x] = o + x * Dp;
      }
      for (int64_t b = 0; b < seg.length; b += KB) {
        const Word* kb = keys + (h * packed + seg.packed + b) * pairs;
        const Word* vb = values + (h * packed + seg.packed + b) / 2 * Dp;
        const int nk = static_cast<int>(std::min<int64_t>(KB, seg.length - b));
        for (int64_t x = 0; x < rows; x += R)
          any_rows<V>(static_cast<int>(std::min<int64_t>(R, rows - x)), qrow + x, pairs, kb, vb, nk, scale, m + x,
                      l + x, orow + x, p);
      }
      for (int64_t x = 0; x < rows; ++x) {
        const float inv = 1.0f / l[x];
        char* dst = op + ((seg.start + first + x) * H + h) * D * element;
        for (int64_t d = 0; d < D; ++d) {
          const float y = o[x * Dp + d] * inv;
          if (to_bf16)
            reinterpret_cast<c10::BFloat16*>(dst)[d] = c10::BFloat16(y);
          else
            reinterpret_cast<float*>(dst)[d] = y;
        }
      }
    }
  });
}

}  // namespace
#endif

bool segment_attention_supports(int64_t head_dim) {
#if QE_SEGMENT_BF16
  return head_dim % 2 == 0 && head_dim >= 2 && head_dim <= 128;
#else
  (void)head_dim;
  return false;
#endif
}

// q, k, v bfloat16 [N, H, D] (rows may be strided, e.g. views of a fused qkv output; each head's D values
// contiguous); cu_seqlens int32/int64 [segments + 1] from 0 to N. Returns [N, H, D], float32 or bfloat16
// (rounded once, from the float32 result).
torch::Tensor segment_attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& cu_seqlens, double scale, bool out_float32) {
  const auto out_dtype = out_float32 ? torch::kFloat32 : torch::kBFloat16;
  TORCH_CHECK(segment_attention_supports(q.dim() == 3 ? q.size(2) : 0),
              "segment_attention_bf16: no kernel for this head size in this build");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
                  v.scalar_type() == torch::kBFloat16, "q, k and v must be bfloat16");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes() && q.stride(2) == 1 && k.stride(2) == 1 &&
                  v.stride(2) == 1, "q, k, v [N, H, D] of one shape, each head's values contiguous");
  const auto cu = cu_seqlens.to(torch::kInt64).contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "cu_seqlens [segments + 1]");
  const int64_t* cp = cu.data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[cu.size(0) - 1] == N, "cu_seqlens must run from 0 to ", N);
  auto out = torch::empty({N, H, D}, q.options().dtype(out_dtype));
#if QE_SEGMENT_BF16
  std::vector<Segment> segments;
  int64_t packed = 0;
  for (int64_t s = 0; s + 1 < cu.size(0); ++s) {
    TORCH_CHECK(cp[s + 1] >= cp[s], "cu_seqlens must not decrease");
    if (cp[s + 1] == cp[s]) continue;
    segments.push_back({cp[s], cp[s + 1] - cp[s], packed});
    packed += (cp[s + 1] - cp[s] + KB - 1) / KB * KB;
  }
  const int64_t pairs = D / 2, Dp = (D + 15) / 16 * 16;
  auto keys = torch::empty({H * packed * pairs}, q.options().dtype(torch::kInt32));
  auto values = torch::empty({H * packed / 2 * Dp}, q.options().dtype(torch::kInt32));
  Word* kp = reinterpret_cast<Word*>(keys.data_ptr<int32_t>());
  Word* vp = reinterpret_cast<Word*>(values.data_ptr<int32_t>());
  const c10::BFloat16 *kd = k.data_ptr<c10::BFloat16>(), *vd = v.data_ptr<c10::BFloat16>();
  // Pack a block of KB keys of one (head, segment) per step: its keys' pairs, and its values in pairs of keys.
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (segment, first key)
  for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s)
    for (int64_t b = 0; b < segments[s].length; b += KB) blocks.emplace_back(s, b);
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, nblocks * H, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t % H;
      const Segment& seg = segments[blocks[t / H].first];
      const int64_t b = blocks[t / H].second, n = std::min<int64_t>(KB, seg.length - b);
      Word* kb = kp + (h * packed + seg.packed + b) * pairs;
      Word* vb = vp + (h * packed + seg.packed + b) / 2 * Dp;
      std::fill(kb, kb + KB * pairs, Word{0});
      std::fill(vb, vb + KB / 2 * Dp, Word{0});
      for (int64_t j = 0; j < n; ++j) {
        const c10::BFloat16* kr = kd + (seg.start + b + j) * k.stride(0) + h * k.stride(1);
        for (int64_t e = 0; e < pairs; ++e) kb[e * KB + j] = word_at(kr + 2 * e);
        const c10::BFloat16* vr = vd + (seg.start + b + j) * v.stride(0) + h * v.stride(1);
        uint16_t* vw = reinterpret_cast<uint16_t*>(vb + j / 2 * Dp) + (j % 2);
        for (int64_t d = 0; d < D; ++d) std::memcpy(vw + 2 * d, vr + d, 2);
      }
    }
  });
  const float fs = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  const c10::BFloat16* qd = q.data_ptr<c10::BFloat16>();
  switch (Dp / 16) {
    case 1: attend<1>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    case 2: attend<2>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    case 3: attend<3>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    case 4: attend<4>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    case 5: attend<5>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    case 6: attend<6>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    case 7: attend<7>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
    default: attend<8>(qd, q.stride(0), q.stride(1), kp, vp, segments, packed, H, D, fs, out); break;
  }
#else
  (void)scale;
#endif
  return out;
}
