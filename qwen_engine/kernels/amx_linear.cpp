// Prefill products on AMX bfloat16 tiles, as exact as a float32 product.
//
// A tile instruction multiplies bfloat16 pairs and adds them into float32, 8192 multiply-adds at a time: on
// this machine ~8x the float32 FMA rate of a core. Two facts make that exact here:
//   * A GGUF weight is a small integer times a per-block scale (w = s q - m). The integers (|q| <= 128) are
//     exact in bfloat16, so the tiles multiply q, and s (and m) are applied to each 32-value partial sum.
//   * A float32 x is the exact sum of three bfloat16 pieces (8 + 8 + 8 significant bits): x = x1 + x2 + x3.
//     Each product xi q is exact in float32, and the tiles add them in float32.
// So y = sum_b s_b (x_b . q_b) - m_b sum(x_b) costs three tile products per block instead of one, and
// differs from the float32 reference only in the order of the additions, as quant_matmul.cpp's other paths
// do. (Values below ~1e-38, whose third piece the hardware treats as zero, lose those last bits.)
//
// Layout: the weights are the A operand, decoded one panel of 32 rows at a time into bfloat16 integers
// [block][row][32 values] (a tile is 16 rows of one block, 1 KiB contiguous), with per-row scales and
// minimums. x is the B operand: its pieces as tiles of 16 tokens, row i holding values 2i and 2i + 1 of each
// token. A tile product gives 16 weight rows x 16 tokens; the scales are per weight row, so each block's
// product is scaled row by row into a float32 accumulator, transposed into y at the end (the tile loop itself:
// amx_tiles.h).
//
// x is taken in chunks of tokens and K whose pieces fit in L2 (every panel reads all of them). Each panel is
// decoded once: with several token chunks, the decoded panels are kept for the later ones.
//
// Types: Q8_0, Q5_0, Q4_0, Q4_K, and BF16 (w = q, scale 1: a bfloat16 checkpoint run in float32; with no
// scale to apply, its products add up in the tiles over a whole K chunk, with no scaling pass). Q6_K stays on
// MKL: its 16-value sub-blocks each have a scale, and its integers times those scales need 13 bits, two
// bfloat16 pieces; that form (six products a block, one scaling per 256 values) ran no faster than MKL
// (0.96-0.97x), so it was dropped.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "amx_linear.h"
#include "amx_tiles.h"
#include "kernels.h"
#include "quant_blocks.h"
#include "vec_math.h"

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if QE_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define QE_AMX_BF16 1
#else
#define QE_AMX_BF16 0
#endif

namespace {
#if QE_AMX_BF16

using qe_amx::PANEL;
constexpr int64_t X_PIECES_BYTES = 1 << 20;  // x pieces of one chunk, kept in L2 while the panels pass
constexpr int64_t MAX_CHUNK_BLOCKS = 32;     // K chunk, in blocks of 32 values
constexpr int64_t KEPT_BYTES = 32 << 20;     // decoded panels kept across token chunks

// Blocks hand out their values in the lane order of Unscaled<Q5_0> (quant_blocks.h); the other types are
// permuted to it, and so is x, so that every product pairs the right values.
inline void to_lane_order(__m512& lo, __m512& hi) {
  if constexpr (Unscaled<Q5_0>::PERMUTED) {
    static const __m512i order = [] {
      alignas(64) int32_t idx[16];
      for (int j = 0; j < 16; ++j) idx[j] = Unscaled<Q5_0>::lane_value(j);
      return _mm512_load_si512(idx);
    }();
    lo = _mm512_permutexvar_ps(order, lo);
    hi = _mm512_permutexvar_ps(order, hi);
  }
}

// 32 float32 values (lo: 0-15, hi: 16-31) rounded to bfloat16, as one 64-byte row.
inline __m512i bf16_row(__m512 lo, __m512 hi) { return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)); }

// A bfloat16 row's halves widened back to float32 (exact).
inline __m512 widen_lo(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
}
inline __m512 widen_hi(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}

// ---- weights: a panel of PANEL rows, each 32-value block b as bfloat16 integers q with w = s q - m ----

// Where one row of a panel goes: q [block][row][32], s and m [block][row].
struct RowOut {
  uint16_t* q;
  float *s, *m;
  void put(int64_t b, __m512 lo, __m512 hi, float scale, float min, bool ordered = false) {
    if (!ordered) to_lane_order(lo, hi);
    _mm512_storeu_si512(q + b * PANEL * 32, bf16_row(lo, hi));
    s[b * PANEL] = scale;
    m[b * PANEL] = min;
  }
};

inline __m512 nibbles(const uint8_t* p, int shift, int offset) {  // 16 nibbles as floats, minus offset
  const __m512i v = _mm512_and_si512(_mm512_srli_epi32(bytes16(p), shift), _mm512_set1_epi32(15));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(offset)));
}

// Blocks [kb0, kb1) of one weight row (for Q4_K, kb0 and kb1 are multiples of 8: whole super-blocks).
void decode_row(int64_t qtype, const uint8_t* row, int64_t kb0, int64_t kb1, RowOut out) {
  __m512 lo, hi;
  switch (qtype) {
    case T_Q8_0:
      for (int64_t b = kb0; b < kb1; ++b) {
        const uint8_t* blk = row + b * Q8_0::BYTES;
        Unscaled<Q8_0>::q(blk, lo, hi);
        out.put(b - kb0, lo, hi, f16(blk), 0.0f);
      }
      break;
    case T_Q5_0:
      for (int64_t b = kb0; b < kb1; ++b) {
        const uint8_t* blk = row + b * Q5_0::BYTES;
        Unscaled<Q5_0>::q(blk, lo, hi);
        out.put(b - kb0, lo, hi, f16(blk), 0.0f, /*ordered=*/true);
      }
      break;
    case T_Q4_0:
      for (int64_t b = kb0; b < kb1; ++b) {
        const uint8_t* blk = row + b * Q4_0::BYTES;
        out.put(b - kb0, nibbles(blk + 2, 0, 8), nibbles(blk + 2, 4, 8), f16(blk), 0.0f);
      }
      break;
    case T_Q4_K:
      for (int64_t b = kb0; b < kb1; b += 8) {
        const uint8_t* blk = row + b / 8 * Q4_K::BYTES;
        float ds[8], dm[8];
        Q4_K::scales(blk, ds, dm);
        for (int j = 0; j < 8; ++j) {
          const uint8_t* qs = blk + 16 + 32 * (j / 2);
          out.put(b - kb0 + j, nibbles(qs, 4 * (j & 1), 0), nibbles(qs + 16, 4 * (j & 1), 0), ds[j], dm[j]);
        }
      }
      break;
    case T_BF16:  // w = q: the weights themselves, exact in bfloat16 (scale 1)
      for (int64_t b = kb0; b < kb1; ++b) {
        const __m512i v = _mm512_loadu_si512(row + b * 64);
        out.put(b - kb0, widen_lo(v), widen_hi(v), 1.0f, 0.0f);
      }
      break;
    default:
      TORCH_CHECK(false, "no AMX decode for GGUF type ", qtype);
  }
}

// Weight rows [n0, n0 + PANEL) of the stacked parts, blocks [kb0, kb1); rows past the end are zero. Returns
// whether any minimum is non-zero.
bool decode_panel(const std::vector<qe_amx::Part>& parts, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* q,
                  float* s, float* m) {
  bool mins = false;
  for (int64_t r = 0; r < PANEL; ++r) {
    const int64_t n = n0 + r;
    const qe_amx::Part* part = nullptr;
    for (const auto& p : parts)
      if (n >= p.first && n < p.first + p.rows) part = &p;
    RowOut out{q + r * 32, s + r, m + r};
    if (part == nullptr) {
      for (int64_t b = 0; b < kb1 - kb0; ++b) out.put(b, _mm512_setzero_ps(), _mm512_setzero_ps(), 0.0f, 0.0f, true);
      continue;
    }
    decode_row(part->qtype, part->data + (n - part->first) * part->row_bytes, kb0, kb1, out);
    mins |= part->qtype == T_Q4_K;
  }
  return mins;
}

// ---- x: tokens [m0, m0 + 16 G) (zero past M), blocks [kb0, kb1), as three bfloat16 pieces in B tiles ----
// pieces: [group][block][piece][16 value pairs][16 tokens][2]; sums: [group][block][16 tokens] (for minimums).
void split_x(const float* x, int64_t M, int64_t K, int64_t m0, int64_t groups, int64_t kb0, int64_t kb1,
             uint16_t* pieces, float* sums) {
  const int64_t blocks = kb1 - kb0;
  at::parallel_for(0, groups * blocks, 8, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const int64_t g = i / blocks, b = kb0 + i % blocks;
      __m512 p[3][16];
      alignas(64) float total[16];
      for (int t = 0; t < 16; ++t) {
        const int64_t mrow = m0 + 16 * g + t;
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
        if (mrow < M) {
          lo = _mm512_loadu_ps(x + mrow * K + 32 * b);
          hi = _mm512_loadu_ps(x + mrow * K + 32 * b + 16);
        }
        total[t] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        to_lane_order(lo, hi);
        for (int k = 0; k < 3; ++k) {  // each piece is what the previous ones leave, rounded to bfloat16
          const __m512i v = bf16_row(lo, hi);
          p[k][t] = _mm512_castsi512_ps(v);
          lo = _mm512_sub_ps(lo, widen_lo(v));
          hi = _mm512_sub_ps(hi, widen_hi(v));
        }
      }
      for (int k = 0; k < 3; ++k) {
        transpose16(p[k]);  // row j: the pair of values 2j, 2j + 1 of each token
        uint16_t* tile = pieces + (i * 3 + k) * 512;
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(tile + 32 * j), p[k][j]);
      }
      std::memcpy(sums + i * 16, total, sizeof(total));
    }
  });
}

// ---- the tile products ----

using qe_amx::configure_tiles;
using qe_amx::panel_products;
using qe_amx::panel_products_unscaled;

// acc [32 rows n0..][32 tokens t0..] into y [M, N] (transposed); first: store (+ bias), else add.
void write_back(const float* acc, int64_t n0, int64_t t0, int64_t M, int64_t N, const float* bias, bool first,
                float* y) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t nb = n0 + 16 * i, tb = t0 + 16 * j;
      if (nb >= N || tb >= M) continue;
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(acc + (16 * i + k) * 32 + 16 * j);
      transpose16(r);  // r[t]: token tb + t, weight rows nb..nb + 15
      const __mmask16 cols = static_cast<__mmask16>((1u << std::min<int64_t>(16, N - nb)) - 1);
      const __m512 add = first && bias ? _mm512_maskz_loadu_ps(cols, bias + nb) : _mm512_setzero_ps();
      for (int t = 0; t < 16 && tb + t < M; ++t) {
        float* out = y + (tb + t) * N + nb;
        const __m512 base = first ? add : _mm512_maskz_loadu_ps(cols, out);
        _mm512_mask_storeu_ps(out, cols, _mm512_add_ps(base, r[t]));
      }
    }
}

inline bool one_piece(int64_t t) {
  return t == T_Q8_0 || t == T_Q5_0 || t == T_Q4_0 || t == T_Q4_K || t == T_BF16;
}

#endif
}  // namespace

namespace qe_amx {

bool tiles_granted() {
#if defined(__AMX_TILE__)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

bool supports(const std::vector<int64_t>& qtypes) {
#if QE_AMX_BF16
  return std::all_of(qtypes.begin(), qtypes.end(), one_piece);
#else
  (void)qtypes;
  return false;
#endif
}

void linear(const float* x, int64_t M, int64_t K, const std::vector<Part>& parts, int64_t N, const float* bias,
            float* y) {
#if QE_AMX_BF16
  TORCH_CHECK(tiles_granted(), "AMX tiles are not available to this process");
  TORCH_CHECK(K % 32 == 0, "K = ", K, " is not a multiple of 32");
  bool kquants = false, unscaled = true;  // unscaled: bfloat16 weights only, no per-block scale to apply
  for (const auto& p : parts) {
    TORCH_CHECK(one_piece(p.qtype), "no AMX decode for GGUF type ", p.qtype);
    kquants |= p.qtype == T_Q4_K;
    unscaled &= p.qtype == T_BF16;
  }
  // K in chunks of whole super-blocks where K-quants are present, about equal in size.
  const int64_t unit = kquants ? 8 : 1, units = K / 32 / unit;
  const int64_t chunks = (units * unit + MAX_CHUNK_BLOCKS - 1) / MAX_CHUNK_BLOCKS;
  const int64_t chunk_blocks = (units + chunks - 1) / chunks * unit;
  // Tokens in chunks of 32 whose pieces (6 bytes a value) fit the L2 budget.
  const int64_t token_chunk = std::max<int64_t>(32, X_PIECES_BYTES / (chunk_blocks * 32 * 6) / 32 * 32);
  const int64_t blocks_total = K / 32, panels = (N + PANEL - 1) / PANEL;
  // x's pieces, kept between calls so their pages are faulted in once (as quant_matmul.cpp's scratch).
  static std::mutex buffers_mutex;
  static std::vector<uint16_t> pieces, kept_q;
  static std::vector<float> sums, kept_s, kept_m;
  std::lock_guard<std::mutex> lock(buffers_mutex);
  // With several token chunks, the decoded panels are kept for the later chunks (decoding is a fifth of a
  // 523-token product), up to KEPT_BYTES at a time: the panels go in groups that fit.
  const int64_t panel_q = blocks_total * PANEL * 32, panel_sm = blocks_total * PANEL;
  const bool keep = M > token_chunk;
  const int64_t group = keep ? std::max<int64_t>(1, KEPT_BYTES / (panel_q * 2 + panel_sm * 8)) : panels;
  std::vector<char> kept_mins(keep ? std::min(group, panels) : 0);
  if (keep) {
    kept_q.resize(std::min(group, panels) * panel_q);
    kept_s.resize(std::min(group, panels) * panel_sm);
    kept_m.resize(std::min(group, panels) * panel_sm);
  }
  for (int64_t pg0 = 0; pg0 < panels; pg0 += group) {
    const int64_t pg1 = std::min(panels, pg0 + group);
    for (int64_t m0 = 0; m0 < M; m0 += token_chunk) {
      const int64_t tokens = std::min(token_chunk, M - m0), groups = (tokens + 31) / 32 * 2;
      for (int64_t kb0 = 0; kb0 < blocks_total; kb0 += chunk_blocks) {
        const int64_t kb1 = std::min(blocks_total, kb0 + chunk_blocks), blocks = kb1 - kb0;
        pieces.resize(groups * blocks * 3 * 512);
        sums.resize(groups * blocks * 16);
        split_x(x, M, K, m0, groups, kb0, kb1, pieces.data(), sums.data());
        at::parallel_for(pg0, pg1, 1, [&](int64_t p0, int64_t p1) {
          std::vector<uint16_t> own_q(keep ? 0 : blocks * PANEL * 32);
          std::vector<float> own_s(keep ? 0 : blocks * PANEL), own_m(keep ? 0 : blocks * PANEL);
          alignas(64) float acc[32 * 32];
          configure_tiles();
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t i = p - pg0;
            uint16_t* q = keep ? kept_q.data() + i * panel_q + kb0 * PANEL * 32 : own_q.data();
            float* s = keep ? kept_s.data() + i * panel_sm + kb0 * PANEL : own_s.data();
            float* m = keep ? kept_m.data() + i * panel_sm + kb0 * PANEL : own_m.data();
            bool mins;
            if (keep && m0 > 0) {
              mins = kept_mins[i];
            } else {
              mins = decode_panel(parts, p * PANEL, kb0, kb1, q, s, m);
              if (keep) kept_mins[i] = mins;
            }
            for (int64_t g = 0; g < groups; g += 2) {
              if (unscaled)
                panel_products_unscaled(q, pieces.data(), blocks, g, acc);
              else
                panel_products(q, s, m, mins, pieces.data(), sums.data(), blocks, g, acc);
              write_back(acc, p * PANEL, m0 + 16 * g, M, N, bias, kb0 == 0, y);
            }
          }
          _tile_release();
        });
      }
    }
  }
#else
  (void)x, (void)M, (void)K, (void)parts, (void)N, (void)bias, (void)y;
  TORCH_CHECK(false, "this build has no AMX bfloat16 kernels");
#endif
}

}  // namespace qe_amx
