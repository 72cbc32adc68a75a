// Decode attention straight from the paged KV cache: one new query token per sequence, its keys and values
// read in place through the sequence's slot list (no gathered copy of the context per layer).
//
// For sequence b and query head h (kv head h / group): out = softmax(scale · q·K^T) · V over the sequence's
// first lengths[b] slots. The same arithmetic as the PyTorch path (kv_cache.decode_attention) up to the
// order of the sums. The pool may hold float32, float16 or bfloat16 (kv_rows.h); its rows are read as float32.

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "kv_rows.h"
#include "vec_math.h"

namespace {

template <class KV>
inline float dot(const float* a, const KV* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
  if constexpr (std::is_same<KV, float>::value) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#elif QE_VEC8
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  }
  for (; i < n; ++i) s += a[i] * kv_float(b[i]);
  return s;
}

#if QE_LANES
// Key and value rows are read this many keys ahead of their use, into L2: the hardware prefetchers alone
// stream ~6 GB/s a core here (a kv head's rows are D floats of every pool row, not one run of memory).
constexpr int64_t AHEAD = 64;

// Prefetches the D values of a kv head's row at p.
template <int D, class KV>
inline void prefetch_row(const KV* p) { prefetch_lines(p, D * sizeof(KV)); }

// The query heads that share a kv head are computed together, so each key and value row is read from memory
// once per group rather than once per head: at long contexts a head's keys and values no longer fit in L2
// next to the other heads', and reading them again per head made attention ~40 % of a 4000-token decode step.
// Grouping changes only the order in which heads are visited: each head's products, sums and reductions are
// the ones it would get alone, so the result does not depend on the group size.
// Written once on vfloat (vec_math.h): V vectors of QE_LANES floats make a head of D floats.

// scores[g * n + s] = (scale · q_g) · key(s) for the G heads of one group (q: G rows of D floats) and the n
// keys of their kv head (key s at base[slots[s] * row + offset]; keys up to `reach` may be prefetched). Four
// keys at a time: their rows are read from memory for the first head and from L1 for the others, and each
// head's four sums are reduced together.
template <int V, class KV>
void group_scores_v(const float* q, int64_t G, const KV* base, const int64_t* slots, int64_t n, int64_t reach,
                    int64_t row, int64_t offset, float scale, float* scaled, float* scores) {
  constexpr int D = QE_LANES * V;
  // scaled (G · D floats of workspace) = scale · q, applied before the products
  const vfloat sv = vset(scale);
  for (int64_t i = 0; i < G * D; i += QE_LANES) vstore(scaled + i, vmul(vload(q + i), sv));
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {
    const KV* key[4];
    for (int r = 0; r < 4; ++r) key[r] = base + slots[s + r] * row + offset;
    if (s + AHEAD + 4 <= reach)
      for (int r = 0; r < 4; ++r) prefetch_row<D>(base + slots[s + AHEAD + r] * row + offset);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = scaled + g * D;
      vfloat acc[4];
      for (int r = 0; r < 4; ++r) {
        acc[r] = vmul(vload(qg), vload(key[r]));
        for (int d = 1; d < V; ++d) acc[r] = vfma(vload(qg + QE_LANES * d), vload(key[r] + QE_LANES * d), acc[r]);
      }
      _mm_storeu_ps(scores + g * n + s, vsum4(acc[0], acc[1], acc[2], acc[3]));
    }
  }
  for (; s < n; ++s) {
    const KV* k = base + slots[s] * row + offset;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = scaled + g * D;
      vfloat acc = vmul(vload(qg), vload(k));
      for (int d = 1; d < V; ++d) acc = vfma(vload(qg + QE_LANES * d), vload(k + QE_LANES * d), acc);
      scores[g * n + s] = vsum(acc);
    }
  }
}

// sums[h] += Σ_s p[h * n + s] · value(s) over keys s0..s1 for H heads and VS vectors of their values starting
// at float `dim` (sums: H rows of D floats), each value slice loaded once for all of them; the running sums
// continue in key order from one call to the next.
template <int D, int VS, int H, class KV>
void group_values_v(const float* p, int64_t n, int64_t s0, int64_t s1, int64_t reach, const KV* base,
                    const int64_t* slots, int64_t row, int64_t offset, int dim, float* sums) {
  vfloat acc[H][VS];
  for (int h = 0; h < H; ++h)
    for (int d = 0; d < VS; ++d) acc[h][d] = vload(sums + h * D + dim + QE_LANES * d);
  for (int64_t s = s0; s < s1; ++s) {
    const KV* value = base + slots[s] * row + offset + dim;
    if (dim == 0 && s + AHEAD < reach) prefetch_row<D>(base + slots[s + AHEAD] * row + offset);
    vfloat v[VS];
    for (int d = 0; d < VS; ++d) v[d] = vload(value + QE_LANES * d);
    for (int h = 0; h < H; ++h) {
      const vfloat w = vset(p[h * n + s]);
      for (int d = 0; d < VS; ++d) acc[h][d] = vfma(w, v[d], acc[h][d]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int d = 0; d < VS; ++d) vstore(sums + h * D + dim + QE_LANES * d, acc[h][d]);
}

// A pass over the values takes VS vectors of each value row for H heads: H · VS accumulators plus VS value
// vectors stay within the registers (AVX-512: a whole row of up to 16 vectors; AVX2's 16 registers: slices of
// up to 4 vectors, 2 heads at a time).
template <int V>
constexpr int values_slice() { return QE_REGS == 32 ? V : (V < 4 ? V : 4); }
template <int V>
constexpr int values_heads() {
  return QE_REGS == 32 ? (V >= 16 ? 1 : V == 8 ? 2 : 4) : (values_slice<V>() == 4 ? 2 : 4);
}

// out[g] = Σ_s p[g * n + s] · value(s) for the G heads. A group needs more than one pass over the values
// (7 heads of 64: 4, then 3); the keys are taken KEYS at a time so the later passes find the rows in L1.
template <int V, class KV>
void group_values(const float* p, int64_t G, int64_t n, int64_t reach, const KV* base, const int64_t* slots,
                  int64_t row, int64_t offset, float* out) {
  constexpr int D = QE_LANES * V, VS = values_slice<V>(), H = values_heads<V>();
  constexpr int64_t KEYS = 8192 / D;  // 32 KiB of value rows
  std::fill(out, out + G * D, 0.0f);
  for (int64_t s0 = 0; s0 < n; s0 += KEYS) {
    const int64_t s1 = std::min(n, s0 + KEYS);
    for (int64_t g = 0; g < G;) {
      // Passes of near-equal size (7 heads, at most 4 a pass: 4 + 3).
      const int64_t passes = (G - g + H - 1) / H, take = (G - g + passes - 1) / passes;
      const float* pg = p + g * n;
      float* og = out + g * D;
      for (int dim = 0; dim < D; dim += QE_LANES * VS) switch (take) {
          case 4: if constexpr (H >= 4) group_values_v<D, VS, 4>(pg, n, s0, s1, reach, base, slots, row, offset, dim, og); break;
          case 3: if constexpr (H >= 3) group_values_v<D, VS, 3>(pg, n, s0, s1, reach, base, slots, row, offset, dim, og); break;
          case 2: if constexpr (H >= 2) group_values_v<D, VS, 2>(pg, n, s0, s1, reach, base, slots, row, offset, dim, og); break;
          default: group_values_v<D, VS, 1>(pg, n, s0, s1, reach, base, slots, row, offset, dim, og);
        }
      g += take;
    }
  }
}

#if defined(__AVX512BF16__)
// A bfloat16 pool's keys and values multiplied as bfloat16 (vdpbf16ps: pairs of bf16 products summed into float32
// lanes, twice the multiply-adds of a float32 FMA a cycle), the arithmetic of PyTorch's bf16 attention: the
// scaled query and the softmax weights are rounded to bf16 before they meet K and V; the sums, the maximum and
// the exponentials stay float32, and so does each head's total (the weights' float32 sum). Reading a bf16 row
// as float32 instead took ~13 vector operations a head and key for 128 multiply-adds; this takes ~8.
// V2 = D / 32: 512-bit vectors of a head's row. (The lossy kv_cache_dtype="bfloat16" option, on CPUs with
// AVX512-BF16; float16 pools and other CPUs read rows as float32.)

inline __m512bh bf16_vector(const c10::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}

// Heads whose value sums stay in the registers: H · 2·V2 accumulators, 2·V2 pair vectors and a weight.
template <int V2>
constexpr int bf16_heads() { return V2 == 4 ? 2 : 4; }

// out rows of H heads (D floats each) = Σ_s pb[h][s] · value(s) over the chunk's n keys (n even, pb zero past the
// real keys; value(s) for s ≥ n_real is a real row, weighted 0). Two keys' values are interleaved by 16-bit word
// so one vdpbf16ps adds p_s v_s + p_s+1 v_s+1 for 16 dims against the broadcast pair of weights; the interleave
// works within 128-bit lanes, so the sums come out in a permuted order, undone once at the end.
template <int V2, int H>
void bf16_values(const uint32_t* const* pairs, const c10::BFloat16* const* rows, int64_t n, float* const* out) {
  __m512 acc[H][2 * V2];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < 2 * V2; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s += 2) {
    __m512bh pv[2 * V2];
    for (int c = 0; c < V2; ++c) {
      const __m512i a = _mm512_loadu_si512(rows[s] + 32 * c), b = _mm512_loadu_si512(rows[s + 1] + 32 * c);
      pv[2 * c] = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(a, b));
      pv[2 * c + 1] = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(a, b));
    }
    for (int h = 0; h < H; ++h) {
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pairs[h][s / 2])));
      for (int c = 0; c < 2 * V2; ++c) acc[h][c] = _mm512_dpbf16_ps(acc[h][c], pv[c], w);
    }
  }
  // unpacklo's 32-bit word 4L + i holds dims 8L + i of its 32 (i < 4), unpackhi's dims 8L + 4 + i.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < V2; ++c) {
      _mm512_storeu_ps(out[h] + 32 * c, _mm512_permutex2var_ps(acc[h][2 * c], first, acc[h][2 * c + 1]));
      _mm512_storeu_ps(out[h] + 32 * c + 16, _mm512_permutex2var_ps(acc[h][2 * c], second, acc[h][2 * c + 1]));
    }
}

// attend_chunk (below) for a bfloat16 pool with bf16 products. work: G · n floats of scores, then G · D / 2 for
// the rounded queries and G · (n / 2 + 1) for the rounded weights (attend_chunk_work).
template <int V2>
void attend_chunk_bf16(const float* q, int64_t G, const c10::BFloat16* kbase, const c10::BFloat16* vbase,
                       const int64_t* slots, int64_t n, int64_t reach, int64_t row, int64_t offset, float scale,
                       float* work, float* out, float* top, float* total) {
  constexpr int D = 32 * V2;
  float* scores = work;
  auto* qb = reinterpret_cast<c10::BFloat16*>(work + G * n);
  auto* pb = reinterpret_cast<c10::BFloat16*>(work + G * n + G * D / 2);
  const int64_t even = n + n % 2;  // keys rounded up to pairs
  // scale · q rounded to bf16 (as the float32 path scales q before its products)
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < G * D; i += 32) {
    const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(q + i), sv), hi = _mm512_mul_ps(_mm512_loadu_ps(q + i + 16), sv);
    _mm512_storeu_si512(qb + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
  int64_t s = 0;
  for (; s < n; s += 4) {
    const int keys = static_cast<int>(std::min<int64_t>(4, n - s));
    const c10::BFloat16* key[4];
    for (int r = 0; r < 4; ++r) key[r] = kbase + slots[s + std::min(r, keys - 1)] * row + offset;
    if (s + AHEAD + 4 <= reach)
      for (int r = 0; r < 4; ++r) prefetch_row<D>(kbase + slots[s + AHEAD + r] * row + offset);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[4];
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm512_dpbf16_ps(_mm512_setzero_ps(), bf16_vector(qb + g * D), bf16_vector(key[r]));
        for (int c = 1; c < V2; ++c)
          acc[r] = _mm512_dpbf16_ps(acc[r], bf16_vector(qb + g * D + 32 * c), bf16_vector(key[r] + 32 * c));
      }
      alignas(16) float four[4];
      _mm_store_ps(four, vsum4(acc[0], acc[1], acc[2], acc[3]));
      std::copy(four, four + keys, scores + g * n + s);
    }
  }
  // the weights, float32 for the maximum and the total, rounded to bf16 (to nearest even) for the values
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    top[g] = max_value(sg, n);
    total[g] = exp_shifted(sg, top[g], sg, n);
    c10::BFloat16* pg = pb + g * (even + 2);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pg + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sg + i))));
    for (; i < n; ++i) pg[i] = c10::BFloat16(sg[i]);
    pg[n] = c10::BFloat16(0.0f);  // the pad of an odd chunk
  }
  thread_local std::vector<const c10::BFloat16*> rows;
  rows.resize(even);
  for (int64_t j = 0; j < even; ++j) rows[j] = vbase + slots[std::min(j, n - 1)] * row + offset;
  constexpr int H = bf16_heads<V2>();
  for (int64_t g = 0; g < G;) {
    const int64_t passes = (G - g + H - 1) / H, take = (G - g + passes - 1) / passes;
    const uint32_t* pairs[H];
    float* outs[H];
    for (int h = 0; h < take; ++h) {
      pairs[h] = reinterpret_cast<const uint32_t*>(pb + (g + h) * (even + 2));
      outs[h] = out + (g + h) * D;
    }
    switch (take) {
      case 4: if constexpr (H >= 4) bf16_values<V2, 4>(pairs, rows.data(), even, outs); break;
      case 3: if constexpr (H >= 3) bf16_values<V2, 3>(pairs, rows.data(), even, outs); break;
      case 2: bf16_values<V2, 2>(pairs, rows.data(), even, outs); break;
      default: bf16_values<V2, 1>(pairs, rows.data(), even, outs);
    }
    g += take;
  }
}
#endif
#endif

// The G query heads of one kv head against n of its keys/values (one chunk of a sequence; `reach` keys of the
// sequence are left from the chunk's start, for prefetching). For each head g: top[g], the largest scaled
// score; total[g] = Σ e^(score - top[g]); and out_g = Σ e^(score - top[g]) · value, not yet divided by total[g]
// (decode_attention merges a sequence's chunks, then divides). q and out are G rows of D floats; `work` holds
// G · (n + D) floats (scores, scaled q), kept by the caller across tasks so the hot loop allocates nothing.
// A bfloat16 pool's products are bf16 where the CPU has AVX512-BF16 (attend_chunk_bf16).
template <class KV>
void attend_chunk(const float* q, int64_t G, const KV* kbase, const KV* vbase, const int64_t* slots, int64_t n,
                  int64_t reach, int64_t row, int64_t offset, int64_t D, float scale, float* work, float* out,
                  float* top, float* total) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<KV, c10::BFloat16>::value) switch (D) {
      case 32: return attend_chunk_bf16<1>(q, G, kbase, vbase, slots, n, reach, row, offset, scale, work, out, top, total);
      case 64: return attend_chunk_bf16<2>(q, G, kbase, vbase, slots, n, reach, row, offset, scale, work, out, top, total);
      case 128: return attend_chunk_bf16<4>(q, G, kbase, vbase, slots, n, reach, row, offset, scale, work, out, top, total);
      default: break;
    }
#endif
  float* scores = work;
#if QE_LANES
  float* scaled = work + G * n;
  switch (D) {
#define QE_GROUP(V)                                                                                             \
  case QE_LANES * V: {                                                                                                \
    group_scores_v<V>(q, G, kbase, slots, n, reach, row, offset, scale, scaled, scores);                        \
    for (int64_t g = 0; g < G; ++g) {                                                                           \
      float* sg = scores + g * n;                                                                               \
      top[g] = max_value(sg, n);                                                                                \
      total[g] = exp_shifted(sg, top[g], sg, n);                                                                \
    }                                                                                                           \
    group_values<V>(scores, G, n, reach, vbase, slots, row, offset, out);                                       \
    return;                                                                                                     \
  }
    QE_GROUP(1) QE_GROUP(2) QE_GROUP(4) QE_GROUP(8) QE_GROUP(16)
#if QE_LANES == 8
    QE_GROUP(32)
#endif
#undef QE_GROUP
    default: break;
  }
#endif
  (void)reach;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* og = out + g * D;
    for (int64_t s = 0; s < n; ++s) scores[s] = dot(qg, kbase + slots[s] * row + offset, D) * scale;
    top[g] = max_value(scores, n);
    total[g] = exp_shifted(scores, top[g], scores, n);
    std::fill(og, og + D, 0.0f);
    for (int64_t s = 0; s < n; ++s) {
      const KV* value = vbase + slots[s] * row + offset;
      for (int64_t d = 0; d < D; ++d) og[d] += scores[s] * kv_float(value[d]);
    }
  }
}

// Keys per chunk of a sequence, at most: its keys are cut into equal chunks.
constexpr int64_t CHUNK = 256;

}  // namespace

// Stores this step's keys/values (k_new, v_new [n, Hkv, D]) at write_slots [n] of the pool (k, v [slots, Hkv, D]),
// rounded to the pool's type as Tensor.to rounds (to nearest, ties to even).
void write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_new, const at::Tensor& v_new,
              const at::Tensor& write_slots) {
  TORCH_CHECK(k_new.dtype() == at::kFloat && v_new.dtype() == at::kFloat && k_new.dim() == 3 &&
                  k_new.size(1) == k.size(1) && k_new.size(2) == k.size(2) && v_new.sizes() == k_new.sizes(),
              "new keys/values must be float32 [n, Hkv, D] like the pool's rows");
  TORCH_CHECK(write_slots.dtype() == at::kLong && write_slots.numel() == k_new.size(0), "one slot per new row");
  const auto kn = k_new.contiguous(), vn = v_new.contiguous(), ws = write_slots.contiguous();
  const int64_t row = k.size(1) * k.size(2), n = kn.size(0);
  TORCH_CHECK(kv_type_supported(k) && v.scalar_type() == k.scalar_type() && k.is_contiguous() && v.is_contiguous(),
              "the pool must be contiguous float32, float16 or bfloat16");
  const int64_t* slot = ws.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(slot[i] >= 0 && slot[i] < k.size(0), "slot ", slot[i], " out of range");
  with_kv_type(k, [&](auto zero) {
    using KV = decltype(zero);
    KV *kp = k.data_ptr<KV>(), *vp = v.data_ptr<KV>();
    const float *ks = kn.data_ptr<float>(), *vs = vn.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {  // std::copy converts each value (c10::Half/BFloat16 round to nearest even)
      std::copy(ks + i * row, ks + (i + 1) * row, kp + slot[i] * row);
      std::copy(vs + i * row, vs + (i + 1) * row, vp + slot[i] * row);
    }
  });
}

bool bf16_decode_products() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && kv_type_supported(k) && v.scalar_type() == k.scalar_type(),
              "q must be float32; k and v float32, float16 or bfloat16 alike");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q [B, Hq, D]; k, v [slots, Hkv, D]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "the cache layers must be contiguous");
  TORCH_CHECK(slots.dtype() == at::kLong && slots.dim() == 2 && lengths.dtype() == at::kLong,
              "slots int64 [B, S], lengths int64 [B]");
  const auto qc = q.contiguous(), sc = slots.contiguous(), lc = lengths.contiguous();
  const int64_t B = qc.size(0), Hq = qc.size(1), D = qc.size(2), Hkv = k.size(1), S = sc.size(1);
  const int64_t num_slots = k.size(0);
  TORCH_CHECK(k.size(2) == D && Hq % Hkv == 0, "head sizes do not match");
  TORCH_CHECK(sc.size(0) == B && lc.numel() == B, "one slot row and one length per sequence");
  const int64_t group = Hq / Hkv;
  const float* qp = qc.data_ptr<float>();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= S, "sequence length ", lp[b], " outside 1..", S);
    for (int64_t s = 0; s < lp[b]; ++s)
      TORCH_CHECK(sp[b * S + s] >= 0 && sp[b * S + s] < num_slots, "slot ", sp[b * S + s], " out of range");
  }
  auto out = at::empty({B, Hq * D}, qc.options());
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  // One task per chunk of a sequence's keys, for all of its kv heads: a pool row holds every kv head of its
  // slot, so a task's heads together read whole rows once. (One task per kv head, as before, read each row in
  // two halves, from two cores, and ran ~1.4x slower at 4096 keys.) The chunks depend only on the sequence's
  // length, never on the batch or the threads, so a sequence's result does not either.
  std::vector<int64_t> first(B + 1, 0), size(B);  // each sequence's first task and its chunk size
  for (int64_t b = 0; b < B; ++b) {
    // An even number of chunks, so that one sequence keeps two threads equally busy; none under 64 keys.
    const int64_t chunks = std::max<int64_t>(1, std::min((lp[b] + 2 * CHUNK - 1) / (2 * CHUNK) * 2, lp[b] / 64));
    size[b] = (lp[b] + chunks - 1) / chunks;
    first[b + 1] = first[b] + (lp[b] + size[b] - 1) / size[b];  // (no empty last chunk)
  }
  const int64_t tasks = first[B], part = Hq * (D + 2);  // per task: out [Hq, D], top [Hq], total [Hq]
  std::vector<float> parts(tasks * part);
  with_kv_type(k, [&](auto zero) {
    using KV = decltype(zero);
    const KV* kp = k.data_ptr<KV>();
    const KV* vp = v.data_ptr<KV>();
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> work;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
        const int64_t s0 = (t - first[b]) * size[b], n = std::min(size[b], lp[b] - s0);
        work.resize(group * (2 * n + D + 4));  // (and the bf16 path's rounded queries and weights)
        float* po = parts.data() + t * part;
        for (int64_t h = 0; h < Hkv; ++h)
          attend_chunk(qp + (b * Hq + h * group) * D, group, kp, vp, sp + b * S + s0, n, lp[b] - s0, Hkv * D, h * D, D,
                       fscale, work.data(), po + h * group * D, po + Hq * D + h * group, po + Hq * D + Hq + h * group);
      }
    });
  });
  // Each head's chunks, rescaled to its largest score, summed and divided by their total. (A single chunk's
  // weight is e^0 = 1 exactly, so it is divided as it is.)
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const auto top_of = [&](int64_t c) { return parts[c * part + Hq * D + hq]; };
        const auto total_of = [&](int64_t c) { return parts[c * part + Hq * D + Hq + hq]; };
        float top = top_of(first[b]);
        for (int64_t c = first[b] + 1; c < first[b + 1]; ++c) top = std::max(top, top_of(c));
        float* o = op + (b * Hq + hq) * D;
        std::fill(o, o + D, 0.0f);
        float total = 0.0f;
        for (int64_t c = first[b]; c < first[b + 1]; ++c) {
          const float w = std::exp(top_of(c) - top);
          total += w * total_of(c);
          const float* pc = parts.data() + c * part + hq * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * pc[d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
  });
  return out;
}

// In place, for scores [..., T, S] of the last T of S positions (query i sees keys 0..S-T+i):
// softmax(scale · scores) over the keys each query sees, 0 for the later ones. One pass instead of scale,
// causal mask and softmax as three tensor operations.
void causal_softmax_(at::Tensor scores, double scale) {
  TORCH_CHECK(scores.dtype() == at::kFloat && scores.is_contiguous() && scores.dim() >= 2 && scores.device().is_cpu(),
              "scores must be contiguous CPU float32 [..., T, S]");
  const int64_t T = scores.size(-2), S = scores.size(-1), rows = scores.numel() / std::max<int64_t>(S, 1);
  TORCH_CHECK(T <= S, "more queries (", T, ") than keys (", S, ")");
  float* p = scores.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = p + r * S;
      const int64_t seen = S - T + r % T + 1;
      for (int64_t s = 0; s < seen; ++s) row[s] *= fscale;
      const float top = max_value(row, seen);
      const float inv = 1.0f / exp_shifted(row, top, row, seen);
      for (int64_t s = 0; s < seen; ++s) row[s] *= inv;
      std::fill(row + seen, row + S, 0.0f);
    }
  });
}

// In place, for x [T, H, D] (rows may be strided, e.g. q and k inside the fused qkv output) and cos/sin [T, D]:
// x = x * cos + rotate_half(x) * sin, pairs (i, i + D/2) as in Qwen. The same operations as the PyTorch
// version (layers.apply_rotary), in the same order, so the results are bit-identical. bfloat16 x is rotated in
// float32 and rounded once at the end, as apply_rotary on x.float() then .to(bfloat16) (the vision towers).
namespace {

#if defined(__AVX512F__)
// 16 values back from float32 (bfloat16: rounded to nearest even, as PyTorch rounds); loads are kv_rows.h's vload.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
#if defined(__AVX512BF16__)
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#endif
#endif

template <class T>
void rotate_rows(T* xp, int64_t st, int64_t sh, const float* cp, const float* sp, int64_t T_, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  at::parallel_for(0, T_, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = cp + t * D, *s = sp + t * D;
      for (int64_t h = 0; h < H; ++h) {
        T* r = xp + t * st + h * sh;
        int64_t i = 0;
#if defined(__AVX512F__)
        constexpr bool vectors = std::is_same<T, float>::value
#if defined(__AVX512BF16__)
                                 || std::is_same<T, c10::BFloat16>::value
#endif
            ;
        // The same products and sums, 16 pairs at a time (the scalar loop is not vectorised: r may alias c, s).
        if constexpr (vectors)
          for (; i + 16 <= half; i += 16) {
            const __m512 a = vload(r + i), b = vload(r + i + half);
            const __m512 nb = _mm512_xor_ps(b, _mm512_set1_ps(-0.0f));  // -b, sign of zero included
            store16(r + i, _mm512_add_ps(_mm512_mul_ps(a, _mm512_loadu_ps(c + i)),
                                         _mm512_mul_ps(nb, _mm512_loadu_ps(s + i))));
            store16(r + i + half, _mm512_add_ps(_mm512_mul_ps(b, _mm512_loadu_ps(c + i + half)),
                                                _mm512_mul_ps(a, _mm512_loadu_ps(s + i + half))));
          }
#endif
        for (; i < half; ++i) {
          const float a = kv_float(r[i]), b = kv_float(r[i + half]);
          r[i] = T(a * c[i] + (-b) * s[i]);
          r[i + half] = T(b * c[i + half] + a * s[i + half]);
        }
      }
    }
  });
}

}  // namespace

void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK((x.dtype() == at::kFloat || x.dtype() == at::kBFloat16) && x.dim() == 3 && x.stride(2) == 1,
              "x must be float32 or bfloat16 [T, H, D]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0 && cos.sizes() == sin.sizes() && cos.size(0) == T && cos.size(1) == D,
              "cos/sin must be [T, D] for an even D");
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  TORCH_CHECK(cc.dtype() == at::kFloat && sc.dtype() == at::kFloat, "cos/sin must be float32");
  const float *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  if (x.dtype() == at::kFloat)
    rotate_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), cp, sp, T, H, D);
  else
    rotate_rows(x.data_ptr<c10::BFloat16>(), x.stride(0), x.stride(1), cp, sp, T, H, D);
}
