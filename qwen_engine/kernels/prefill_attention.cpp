// Causal attention for a prompt chunk, fused: the T new queries of a sequence against its first S cached
// positions (query i sits at position S - T + i and sees keys 0..S-T+i), read in place from the paged pool
// through the sequence's slot list.
//
// The score matrix is never materialised. Keys are taken KB (4 vectors) at a time; for each block, the scores
// of a few query rows are computed in registers, folded into a running softmax (the maximum so far m, the sum
// of exponentials l, and the output rescaled by e^(m_old - m_new)), and the block's values are added to the
// output with those weights; the output is divided by l at the end. A block of keys and values (32 KiB at
// head size 64) serves every query head of its kv head and several query positions while it sits in L1.
//
// The maths is softmax(scale · q·K^T) · V as in kv_cache.causal_attention; only the order of the sums and
// where the maximum is subtracted differ, so results agree to float32 rounding. A float16 or bfloat16 pool
// (kv_rows.h) is read as float32: the keys as they are transposed, the values as they are loaded.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "kv_rows.h"
#include "vec_math.h"

#if QE_LANES
namespace {

// Written once on vec_math.h's vfloat: a head of D floats is V vectors of QE_LANES.
constexpr int KB = 4 * QE_LANES;  // keys per block: 4 vectors of scores per query row
// Query rows scored together: R x 4 score vectors, 4 key vectors and a broadcast stay in the registers.
constexpr int R = QE_REGS == 32 ? 4 : 2;
// Query rows (positions x heads of a kv head) per task: they share each block of keys and values while it sits
// in L1, and each task reads its kv head's keys and values once from L2 or memory. 256 rather than 32: at
// 4096 keys those are 2 MiB a head, and a 512-query chunk ran 1.17x faster (the same results, bit for bit).
constexpr int TILE_ROWS = 256;

// RR query rows against one block of keys; row r sees the block's first n[r] keys (0 ≤ n[r] ≤ KB; a row that
// sees none keeps its state, which is finite by then: every row sees the first block's key 0). kt: the
// block's keys transposed, D rows of ldk floats; vals(j): value row j. m, l: the rows' running max and sum;
// o: their outputs so far; p: R · KB floats of workspace. The loops over rows and vectors are unrolled so the
// RR x 4 score vectors stay in registers (an indexed array would be kept in memory, stored every step).
template <int V, int RR, class Vals>
inline void block_rows(const float* const* q, const float* kt, int64_t ldk, Vals vals, const int* n, float scale,
                       float* const* m, float* const* l, float* const* o, float* p) {
  constexpr int D = QE_LANES * V, L = QE_LANES;
  vfloat s[RR][4];
  #pragma GCC unroll 16
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) s[r][c] = vzero();
  for (int d = 0; d < D; ++d) {
    const float* kd = kt + d * ldk;
    const vfloat k0 = vload(kd), k1 = vload(kd + L), k2 = vload(kd + 2 * L), k3 = vload(kd + 3 * L);
    #pragma GCC unroll 16
    for (int r = 0; r < RR; ++r) {
      const vfloat qd = vset(q[r][d]);
      s[r][0] = vfma(qd, k0, s[r][0]);
      s[r][1] = vfma(qd, k1, s[r][1]);
      s[r][2] = vfma(qd, k2, s[r][2]);
      s[r][3] = vfma(qd, k3, s[r][3]);
    }
  }
  const vfloat sv = vset(scale), ninf = vset(-std::numeric_limits<float>::infinity());
  alignas(64) float m_old[16] = {}, m_new[16] = {}, alpha[16];
  int keys = 0;  // keys any row sees
  #pragma GCC unroll 16
  for (int r = 0; r < RR; ++r) {
    keys = std::max(keys, n[r]);
    vfloat top = ninf;
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {  // scaled scores of the keys the row sees, -inf for the others
      s[r][c] = vfirst(vmul(s[r][c], sv), std::clamp(n[r] - L * c, 0, L), ninf);
      top = vmax(top, s[r][c]);
    }
    m_old[r] = *m[r];
    m_new[r] = std::max(m_old[r], vmaxall(top));
  }
  // e^(m_old - m_new) for all rows at once (0 up to float32's smallest normal for the first block's -inf)
  vstore(alpha, vexp(vsub(vload(m_old), vload(m_new))));
  #pragma GCC unroll 16
  for (int r = 0; r < RR; ++r) {
    const vfloat shift = vset(m_new[r]);
    vfloat sum = vzero();
    #pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {
      const vfloat e = vfirst(vexp(vsub(s[r][c], shift)), std::clamp(n[r] - L * c, 0, L), vzero());
      vstore(p + r * KB + L * c, e);
      sum = vadd(sum, e);
    }
    *l[r] = *l[r] * alpha[r] + vsum(sum);
    *m[r] = m_new[r];
  }
  // Outputs 4 vectors of each row at a time, so RR x 4 accumulators fit in the registers.
  constexpr int CV = V < 4 ? V : 4;
  for (int c0 = 0; c0 < V; c0 += CV) {
    vfloat acc[RR][CV];
    #pragma GCC unroll 16
    for (int r = 0; r < RR; ++r) {
      const vfloat a = vset(alpha[r]);
      #pragma GCC unroll 16
      for (int c = 0; c < CV; ++c) acc[r][c] = vmul(vload(o[r] + L * (c0 + c)), a);
    }
    for (int j = 0; j < keys; ++j) {
      const auto* v = vals(j) + L * c0;
      vfloat vv[CV];
      #pragma GCC unroll 16
      for (int c = 0; c < CV; ++c) vv[c] = vload(v + L * c);
      #pragma GCC unroll 16
      for (int r = 0; r < RR; ++r) {
        const vfloat pj = vset(p[r * KB + j]);
        #pragma GCC unroll 16
        for (int c = 0; c < CV; ++c) acc[r][c] = vfma(pj, vv[c], acc[r][c]);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < RR; ++r)
      #pragma GCC unroll 16
      for (int c = 0; c < CV; ++c) vstore(o[r] + L * (c0 + c), acc[r][c]);
  }
}

template <int V, class Vals>
inline void block_any_rows(int rows, const float* const* q, const float* kt, int64_t ldk, Vals vals, const int* n,
                           float scale, float* const* m, float* const* l, float* const* o, float* p) {
  switch (rows) {
    case 4: if constexpr (R >= 4) block_rows<V, 4>(q, kt, ldk, vals, n, scale, m, l, o, p); break;
    case 3: if constexpr (R >= 3) block_rows<V, 3>(q, kt, ldk, vals, n, scale, m, l, o, p); break;
    case 2: block_rows<V, 2>(q, kt, ldk, vals, n, scale, m, l, o, p); break;
    default: block_rows<V, 1>(q, kt, ldk, vals, n, scale, m, l, o, p); break;
  }
}

template <int V, class KV>
void attend(const float* qp, int64_t q_tok, int64_t q_head, const KV* kp, const KV* vp, const int64_t* slots,
            int64_t T, int64_t S, int64_t Hq, int64_t Hkv, float scale, float* out) {
  constexpr int D = QE_LANES * V;
  // ldk: the keys rounded up to whole blocks plus one cache line, so that the D rows of a block do not all map
  // to the same L1 set (at 4096 keys they were 16 KiB apart and evicted one another: 1.9x slower at head 64).
  const int64_t group = Hq / Hkv, row = Hkv * D, ldk = (S + KB - 1) / KB * KB + 16, first = S - T;
  // Keys transposed per kv head ([Hkv][D][ldk], zero past S), so a block's scores are vector products.
  std::vector<float> kt(Hkv * D * ldk, 0.0f);
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const KV* k = kp + slots[s] * row + h * D;
        for (int d = 0; d < D; ++d) kt[(h * D + d) * ldk + s] = kv_float(k[d]);
      }
  });
  const int64_t per_task = std::max<int64_t>(1, TILE_ROWS / group);  // query positions per task
  const int64_t tiles = (T + per_task - 1) / per_task;
  // Later queries see more keys: tasks alternate between the first and the last tiles, so each thread's
  // contiguous share of them holds as much work as the other's.
  at::parallel_for(0, tiles * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ml(2 * per_task * group), p(R * KB);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / Hkv, h = t % Hkv;
      const int64_t tile = k % 2 == 0 ? k / 2 : tiles - 1 - k / 2;
      const int64_t i0 = tile * per_task, i1 = std::min(T, i0 + per_task), rows = (i1 - i0) * group;
      // The tile's rows, position-major: row x is query head h·group + x % group of position i0 + x / group.
      float* m = ml.data();
      float* l = m + per_task * group;
      std::fill(m, l, -std::numeric_limits<float>::infinity());
      std::fill(l, l + per_task * group, 0.0f);
      auto out_row = [&](int64_t x) { return out + (i0 + x / group) * Hq * D + (h * group + x % group) * D; };
      for (int64_t x = 0; x < rows; ++x) std::fill_n(out_row(x), D, 0.0f);
      const float* kth = kt.data() + h * D * ldk;
      const int64_t last = first + i1 - 1;  // the tile's last query sees keys 0..last
      for (int64_t b0 = 0; b0 <= last; b0 += KB) {
        auto vals = [&](int j) { return vp + slots[b0 + j] * row + h * D; };
        for (int64_t x0 = 0; x0 < rows; x0 += R) {
          const int count = static_cast<int>(std::min<int64_t>(R, rows - x0));
          const float* q[R];
          float *o[R], *mr[R], *lr[R];
          int n[R];
          for (int r = 0; r < count; ++r) {
            const int64_t x = x0 + r, i = i0 + x / group;
            q[r] = qp + i * q_tok + (h * group + x % group) * q_head;
            o[r] = out_row(x);
            mr[r] = m + x;
            lr[r] = l + x;
            n[r] = static_cast<int>(std::clamp<int64_t>(first + i + 1 - b0, 0, KB));
          }
          if (n[count - 1] > 0)  // the chunk's last row sees the most keys
            block_any_rows<V>(count, q, kth + b0, ldk, vals, n, scale, mr, lr, o, p.data());
        }
      }
      for (int64_t x = 0; x < rows; ++x) {
        float* o = out_row(x);
        const float inv = 1.0f / l[x];
        for (int d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  });
}

}  // namespace
#endif

// q [T, Hq, D] (rows may be strided, e.g. inside the fused qkv output); k, v: a layer of the pool
// [slots, Hkv, D]; slots int64 [S]: the sequence's first S positions. Returns [T, Hq · D].
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& slots, double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && kv_type_supported(k) && v.scalar_type() == k.scalar_type(),
              "q must be float32; k and v float32, float16 or bfloat16 alike");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && k.dim() == 3 && v.sizes() == k.sizes(),
              "q [T, Hq, D] with contiguous rows; k, v [slots, Hkv, D]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "the cache layers must be contiguous");
  TORCH_CHECK(slots.dtype() == at::kLong && slots.dim() == 1, "slots must be int64 [S]");
  const auto sc = slots.contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = sc.size(0);
  TORCH_CHECK(k.size(2) == D && Hq % Hkv == 0, "head sizes do not match");
  TORCH_CHECK(T >= 1 && T <= S, "queries (", T, ") must be 1..", S, " (the keys)");
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(sp[s] >= 0 && sp[s] < k.size(0), "slot ", sp[s], " out of range");
  auto out = at::empty({T, Hq * D}, q.options());
#if QE_LANES
  const float* qp = q.data_ptr<float>();
  const float fs = static_cast<float>(scale);
  float* op = out.data_ptr<float>();
  const bool done = with_kv_type(k, [&](auto zero) {
    using KV = decltype(zero);
    const KV* kp = k.data_ptr<KV>();
    const KV* vp = v.data_ptr<KV>();
    switch (D) {
      case 32: attend<32 / QE_LANES>(qp, q.stride(0), q.stride(1), kp, vp, sp, T, S, Hq, Hkv, fs, op); return true;
      case 64: attend<64 / QE_LANES>(qp, q.stride(0), q.stride(1), kp, vp, sp, T, S, Hq, Hkv, fs, op); return true;
      case 128: attend<128 / QE_LANES>(qp, q.stride(0), q.stride(1), kp, vp, sp, T, S, Hq, Hkv, fs, op); return true;
      default: return false;
    }
  });
  if (done) return out;
#endif
  TORCH_CHECK(false, "prefill_attention: no kernel for head size ", D, " in this build");
}

bool prefill_attention_supports(int64_t head_dim) {
#if QE_LANES
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
#else
  (void)head_dim;
  return false;
#endif
}
