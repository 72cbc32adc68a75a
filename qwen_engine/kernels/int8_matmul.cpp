// The lossy w8a8 mode's product (models/w8a8.py): y = x @ W^T with W re-quantised to int8 and x quantised on the
// fly to int8, both in groups of G values along the input (one scale per group of each weight row and of each row
// of x). The weight scales are kept group by group, sw [groups, N], so a unit's 8 (or 16) outputs are adjacent.
//
//   y[m, n] = sum_g sx[m, g] * sw[g, n] * (q[m, g, :] . w[n, g, :]) + bias[n]
//
// The group dot products are exact integers; only the scaling is float. The weights are stored as unsigned
// bytes u = w + 128, the operand order AVX-512 VNNI wants (vpdpbusd: unsigned x signed bytes, four products
// summed into each 32-bit lane), so each group's sum carries an extra 128 * sum(q), which the accumulator's
// starting value takes off again (quantize_rows: the lane starts).
//
// AVX2 has no vpdpbusd. Its vpmaddubsw (unsigned x signed bytes, pairs summed into int16) would overflow int16
// on u * q (2 * 255 * 127), so it multiplies |q| by w with q's sign moved onto it (2 * 127 * 127 fits; w is
// within ±127, so w = u ^ 0x80 and its negation are bytes), then vpmaddwd sums the pairs into 32-bit lanes.
//
// Without VNNI or AVX2 the extension does not define these functions and models/w8a8.py computes the same numbers
// in PyTorch.
//
// Where AMX tiles are granted, the units (of 16 rows: already a weight tile's layout) go to the tiles from 8 rows of
// x (amx_units_range), with the same outputs; w8a8 keeps its own AMX layout there (amx_linear, groups of 64+).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "amx_linear.h"
#include "kernels.h"
#include "vec_math.h"

#if QE_INT8
#include <immintrin.h>

// (The tile kernels scale and store with AVX-512: a build told -mno-avx512f on an AMX CPU has no AMX path.)
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define QE_AMX 1
#else
#define QE_AMX 0
#endif

namespace {

// The weights stream from memory (or a mapped file); the hardware prefetchers stop at each 4 KiB page. How far
// ahead: AVX2 on Zen 3, the LM head at one row of x: 4 KiB 24 GB/s, 16 KiB 21.5, 64 KiB 19; AVX-512 on Zen 4, a
// w8a8 decode step: 4 KiB 24.1-24.7 ms, 16 KiB 16.0-17.0 ms (none before: 28.5 ms).
constexpr int64_t PREFETCH = QE_INT8 == 512 ? 16384 : 4096;

// Group g's share (of `groups`) of `lines` cache lines from `fetch` (the next units), into L2: the units tiles
// spread the next units' fetch over their groups.
inline void prefetch_share(const char* fetch, int64_t lines, int64_t g, int64_t groups) {
  for (int64_t l = g * lines / groups; l < (g + 1) * lines / groups; ++l) _mm_prefetch(fetch + l * 64, _MM_HINT_T1);
}

// The weight scales (and offsets) of NR units a few groups ahead, by the tile that streams the units alone (one
// tile of rows: decode): a group's lie a row of N floats after the previous group's, a page or more away for the
// wider products, where the hardware prefetchers do not follow.
constexpr int64_t SCALES_AHEAD = 4;
template <int NR>
inline void prefetch_scales(const float* sw, const float* so, int64_t g, int64_t groups, int64_t ldy) {
  if (g + SCALES_AHEAD >= groups) return;
  for (int j = 0; j < NR; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(sw + (g + SCALES_AHEAD) * ldy + 16 * j), _MM_HINT_T0);
    if (so) _mm_prefetch(reinterpret_cast<const char*>(so + (g + SCALES_AHEAD) * ldy + 16 * j), _MM_HINT_T0);
  }
}

// A group of a row of x as quantised, summed and scaled back: sx * sum(q), the sum read off the lane start
// (-8 * sum(q), quantize_rows). The a8 mode's K-quant weights are scale * q + offset in each group, so their
// product gains offset * this.
inline float group_sum(const float* sx, const int32_t* starts, int64_t i) {
  return sx[i] * static_cast<float>(-starts[i] / 8);
}

#if QE_INT8 == 512
// Outputs a unit of weight rows holds: 16 (one 16-lane vector) with AVX-512 VNNI, 8 with AVX2.
constexpr int64_t UNIT_ROWS = 16;

inline __mmask16 first_of_16(int cols) {
  return cols >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << std::max(cols, 0)) - 1);
}

// One group's weight scales of a unit's 16 outputs (zeros past `cols`: the last unit of a weight is padded).
inline __m512 unit_scales16(const float* sw, int cols) { return _mm512_maskz_loadu_ps(first_of_16(cols), sw); }

// y[0..cols) = acc + bias for one unit's 16 outputs (cols < 16 in the last unit of a weight). `stream`: a whole
// aligned line goes straight to memory (STREAM_Y_BYTES below).
inline void store_unit16(__m512 acc, float* y, const float* bias, int cols, bool stream = false) {
  if (stream && cols >= 16 && !bias && (reinterpret_cast<uintptr_t>(y) & 63) == 0) return _mm512_stream_ps(y, acc);
  const __mmask16 mask = first_of_16(cols);
  if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias));
  _mm512_mask_storeu_ps(y, mask, acc);
}

// G values of x → G int8 (x / scale rounded half to even, as torch.round in the reference, models/w8a8.py) and
// their sum; returns the scale, max |x| / 127.
float quantize_group(const float* x, int64_t G, int8_t* q, int32_t& sum) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
  const __m512 d = _mm512_set1_ps(scale > 0.0f ? scale : 1.0f);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512i sums = _mm512_setzero_si512();
  for (int64_t k = 0; k < G; k += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), d),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    sums = _mm512_add_epi32(sums, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
  }
  sum = _mm512_reduce_add_epi32(sums);
  return scale;
}

// Lane i of the result = op over the 16 lanes of v[i] (max or add): 46 shuffles and ops for 16 groups where a
// reduction each took 8 in a chain, and the groups' scales and sums no longer wait on one another.
template <typename Op>
inline __m512 across16(__m512 (&v)[16], Op op) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // 128-bit quarters: lanes 0-7 of a[k] v[2k]'s, lanes 8-15 v[2k + 1]'s
    a[k] = op(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44), _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // quarter j of b[k]: v[4k + j]'s four partials
    b[k] = op(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88), _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // quarter j of c[k]: two partials of v[8k + j], then two of v[8k + 4 + j]
    c[k] = op(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44), _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
  const __m512 d = op(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  // element 4j + t of d is v[4t + j]'s
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, d);
}

// quantize_group for n <= 16 groups side by side (x's values G apart, none past the row's end): the same scales,
// bytes and sums, with the reductions across groups done together (across16). A 32-stream decode step quantises
// ~300 groups of 16-32 values a layer; one at a time they took ~37 cycles each.
void quantize_groups16(const float* x, int64_t G, int n, int8_t* q, float* scales, int32_t* starts) {
  __m512 part[16];
  for (int i = 0; i < 16; ++i) {
    __m512 amax = _mm512_setzero_ps();
    if (i < n)
      for (int64_t k = 0; k < G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i * G + k)));
    part[i] = amax;
  }
  const __m512 scale = _mm512_div_ps(across16(part, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }),
                                     _mm512_set1_ps(127.0f));
  const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
  _mm512_mask_storeu_ps(scales, live, scale);
  alignas(64) float d[16];
  _mm512_store_ps(d, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ),
                                          _mm512_set1_ps(1.0f), scale));
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int i = 0; i < 16; ++i) {
    __m512 sum = _mm512_setzero_ps();  // the group's integers summed in float: exact (|sum| <= 127 G < 2^24)
    if (i < n) {
      const __m512 di = _mm512_set1_ps(d[i]);
      for (int64_t k = 0; k < G; k += 16) {
        const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i * G + k), di),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 r = _mm512_min_ps(_mm512_max_ps(rounded, lo), hi);
        sum = _mm512_add_ps(sum, r);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * G + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
      }
    }
    part[i] = sum;
  }
  const __m512i sums = _mm512_cvtps_epi32(across16(part, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); }));
  _mm512_mask_storeu_epi32(starts, live, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-8)));
}

// One group of G weights → G bytes int8 + 128; returns the group's scale.
float quantize_weight_group(const float* row, int64_t G, uint8_t* dst) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f), offset = _mm512_set1_ps(128.0f);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
  const __m512 d = _mm512_set1_ps(scale > 0.0f ? scale : 1.0f);
  for (int64_t k = 0; k < G; k += 16) {
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), d),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 u = _mm512_add_ps(_mm512_min_ps(_mm512_max_ps(q, lo), hi), offset);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(u)));
  }
  return scale;
}

// The a8 mode's nibble units (models/a8.py: pack_nibbles16): GGUF quants of 4 or 5 bits kept at 4 bits plus 0 or 1
// bit plane instead of a byte each, so a decode step streams 0.75 bytes a weight where the byte units stream
// 1.125 (Q5_0 with its scales); the products of one row of x lean on those bytes: gate/up's took 0.25-0.27 ms
// instead of 0.31-0.33 streamed alone, and 1.24x less time in a decode step (benchmarks.md, thirty-fifth pass).
// A unit of 16 rows holds, group by group, G / 8 vectors of 64 bytes, each two of the byte layout's 4-value steps
// (step 2v in the low nibbles, 2v + 1 in the high), then P planes of G / 4 masks of 64 bits (plane p's bit i:
// bit 4 + p of byte i of that step's code). A code c is the quant as the GGUF stores it (0..15 or 0..31), the
// weight scale * (c - zero) (+ offset for the K-quants with minima); each lane starts at -zero * sum(q) = zero / 8
// times the lane start. The integers equal the byte units' exactly.

// Steps 2v and 2v + 1 of a nibble unit's group at w, as codes (the byte units' two 64-byte vectors).
template <int P>
inline void nibble_pair(const uint8_t* w, int64_t G, int64_t v, __m512i& lo, __m512i& hi) {
  const __m512i low = _mm512_set1_epi8(0x0F), both = _mm512_loadu_si512(w + 64 * v);
  lo = _mm512_and_si512(both, low);
  hi = _mm512_and_si512(_mm512_srli_epi16(both, 4), low);
  for (int p = 0; p < P; ++p) {
    uint64_t bits[2];
    std::memcpy(bits, w + 8 * G + p * 2 * G + 16 * v, 16);  // plane p: G / 4 masks of 8 bytes
    const __m512i bit = _mm512_set1_epi8(static_cast<char>(16 << p));
    lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(bits[0]), lo, bit);
    hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(bits[1]), hi, bit);
  }
}

// A nibble unit → its codes as a byte unit (units_tile's order, dst 16 * K bytes). Over more than 8 rows of x
// each tile of rows would unpack the unit again (tiles of 4 over 8 rows ran at 0.91x the byte units' speed, Q5_0),
// so there the units are expanded once, into L2, and the byte tiles take them (0.97-1.07x from 16 to 128 rows).
template <int P>
void expand_nibbles(const uint8_t* wu, int64_t K, int64_t G, uint8_t* dst) {
  const int64_t group_bytes = G * (8 + 2 * P);
  for (int64_t g = 0; g < K / G; ++g)
    for (int64_t v = 0; v < G / 8; ++v) {
      __m512i lo, hi;
      nibble_pair<P>(wu + g * group_bytes, G, v, lo, hi);
      uint8_t* step = dst + (g * G / 4 + 2 * v) * 64;
      _mm512_storeu_si512(step, lo);
      _mm512_storeu_si512(step + 64, hi);
    }
}
constexpr void (*EXPAND_NIBBLES[2])(const uint8_t*, int64_t, int64_t, uint8_t*) = {expand_nibbles<0>,
                                                                                  expand_nibbles<1>};

template <int P, int MR, int NR>
inline void nibble_products(const uint8_t* wu, const int8_t* q, int64_t K, int64_t G, int64_t g, bool ahead,
                            __m512i (&dot)[MR][NR]) {
  const int64_t unit_bytes = K * (8 + 2 * P), group_bytes = G * (8 + 2 * P);
  for (int64_t v = 0; v < G / 8; ++v) {
    const int64_t k = g * G + 8 * v;
    for (int j = 0; j < NR; ++j) {
      const uint8_t* w = wu + j * unit_bytes + g * group_bytes;
      if (ahead) {
        _mm_prefetch(reinterpret_cast<const char*>(w + 64 * v + PREFETCH), _MM_HINT_T1);
        if (v == 0)
          for (int64_t l = 0; l < P * 2 * G; l += 64)
            _mm_prefetch(reinterpret_cast<const char*>(w + 8 * G + l + PREFETCH), _MM_HINT_T1);
      }
      __m512i lo, hi;
      nibble_pair<P>(w, G, v, lo, hi);
      for (int i = 0; i < MR; ++i) {
        int32_t x0, x1;
        std::memcpy(&x0, q + i * K + k, 4);
        std::memcpy(&x1, q + i * K + k + 4, 4);
        dot[i][j] = dpbusd(dpbusd(dot[i][j], lo, _mm512_set1_epi32(x0)), hi, _mm512_set1_epi32(x1));
      }
    }
  }
}
// The units layout on AVX-512 VNNI (models/w8a8.py: pack_units16): units of 16 rows, each [K / 4][row][k % 4] as
// unsigned bytes u = w + 128, so a 64-byte load is 4 values of 16 rows, multiplied against 4 bytes of a row of x
// broadcast; each lane of an accumulator is one output, no sums across lanes. A group's integers are scaled with
// one convert, multiply and FMA per 16 outputs. (The previous layout, units of 8 rows [K / 8][row][k % 8], spent
// a lane pair on each output and so twice the scaling per group: at G = 128 that was ~25 % of its time, 298 G
// multiply-adds/s on two Zen 4 cores against 391 at G = 512.)
// The weights' +128 adds 128 * sum(q) to each group's sum; each lane starts at -128 * sum(q) = 16x the lane start
// (zero8 = 16; the a8 mode's nibble units, expanded to bytes of their codes, pass their own zero / 8).
// y[i, 0..cols) = (products of row i of q with the NR units at wu) + bias, for MR rows of q; sw: the units'
// weight scales of group 0, each next group's ldy (= N) further on; `ahead`: prefetch each unit's stream
// PREFETCH bytes ahead; `fetch_lines` lines from `fetch` (the next units) are prefetched a few at each group.
// P >= 0: the a8 mode's nibble units with P bit planes instead (nibble_pair below: the same integers).
template <int P, int MR, int NR>
void units_tile(const uint8_t* wu, const int8_t* q, const uint8_t*, const int32_t* starts, const float* sx, int64_t K,
                int64_t G, float* y, int64_t ldy, const float* sw, const float* so, const float* bias, int cols,
                int zero8, bool ahead, const char* fetch, int64_t fetch_lines, bool stream) {
  const int64_t groups = K / G;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_share(fetch, fetch_lines, g, groups);
    if (ahead) prefetch_scales<NR>(sw, so, g, groups, ldy);
    __m512i dot[MR][NR];
    for (int i = 0; i < MR; ++i) {
      const __m512i start = _mm512_set1_epi32(zero8 * starts[i * groups + g]);
      for (int j = 0; j < NR; ++j) dot[i][j] = start;
    }
    if constexpr (P < 0) {
      for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
        __m512i wv[NR];
        for (int j = 0; j < NR; ++j) {
          const uint8_t* w = wu + j * 16 * K + k * 16;
          if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH), _MM_HINT_T1);
          wv[j] = _mm512_loadu_si512(w);
        }
        for (int i = 0; i < MR; ++i) {
          int32_t xs;
          std::memcpy(&xs, q + i * K + k, 4);
          const __m512i xb = _mm512_set1_epi32(xs);
          for (int j = 0; j < NR; ++j) dot[i][j] = dpbusd(dot[i][j], wv[j], xb);
        }
      }
    } else {
      nibble_products<P, MR, NR>(wu, q, K, G, g, ahead, dot);
    }
    __m512 swv[NR];
    for (int j = 0; j < NR; ++j) swv[j] = unit_scales16(sw + g * ldy + 16 * j, cols - 16 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512 s = _mm512_set1_ps(sx[i * groups + g]);
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(swv[j], s), acc[i][j]);
    }
    if (so) {  // weight offsets (the a8 mode's K-quants): + offset * (the group's sum of x as quantised)
      for (int j = 0; j < NR; ++j) swv[j] = unit_scales16(so + g * ldy + 16 * j, cols - 16 * j);
      for (int i = 0; i < MR; ++i) {
        const __m512 s = _mm512_set1_ps(group_sum(sx, starts, i * groups + g));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(swv[j], s, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      store_unit16(acc[i][j], y + i * ldy + 16 * j, bias ? bias + 16 * j : nullptr, cols - 16 * j, stream);
}

#if QE_AMX
// The units on AMX tiles (Sapphire Rapids and later), from 8 rows of x: a unit's 16 rows are [K / 4][row][k % 4],
// so a stretch of K is already a weight tile, rows of 64 bytes (4 values of 16 outputs), and a tile instruction
// multiplies up to 16 rows of x by it. The a8 mode scales every 16-32 values, so a tile covers one group (G / 4
// rows of the weight tile, G bytes of x; 64-byte pieces of a coarser group add into the same product tile); each
// product tile is stored and scaled as units_tile scales its integers, in the same order: the same outputs bit for
// bit. On the vector units an 8-stream a8 step's gate/up multiplied at ~130 G a second on this kind of host, one
// vpdpbusd after another; on the tiles the scaling is most of the work (forty-second pass in benchmarks.md).
// Tiles: 0 = x (the rows of one group), 1-3 = the group's weights of up to three units, 4-6 = their products.
bool amx_units = true;  // tests switch it off to compare with the vector tiles

void configure_units(int rows, int64_t chunk) {
  qe_amx::TileConfig c;
  c.rows[0] = static_cast<uint8_t>(rows), c.colsb[0] = static_cast<uint16_t>(chunk);
  for (int t = 1; t <= 3; ++t) c.rows[t] = static_cast<uint8_t>(chunk / 4), c.colsb[t] = 64;
  for (int t = 4; t <= 6; ++t) c.rows[t] = static_cast<uint8_t>(rows), c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// Groups g0..g1 of `rows` (<= 16) rows of q against NR byte units, added into acc [rows][48]: unit j's group g0 at
// wg + j * stride, each next group 16 * G bytes on; in pieces of `chunk` values (G, or 64 where G is coarser). sw,
// so: the units' scales (and offsets) of group 0, as units_tile's; zero8, cols too. `ahead`: prefetch the scales a
// few groups ahead (the first tile of rows); fetch, lines: the next units, a share at each group.
template <int NR>
void amx_units_groups(const uint8_t* wg, int64_t stride, const int8_t* q, const int32_t* starts, const float* sx,
                      int64_t K, int64_t G, int64_t chunk, int rows, int64_t g0, int64_t g1, int64_t ldy,
                      const float* sw, const float* so, int cols, int zero8, float* acc, bool ahead,
                      const char* fetch, int64_t lines, int64_t slice, int64_t slices) {
  const int64_t groups = K / G;
  alignas(64) int32_t dots[NR][16][16];
  for (int64_t g = g0; g < g1; ++g) {
    prefetch_share(fetch, lines, slice + g - g0, slices);
    if (ahead) prefetch_scales<NR>(sw, so, g, groups, ldy);
    const uint8_t* w = wg + (g - g0) * 16 * G;
    _tile_zero(4);
    if constexpr (NR > 1) _tile_zero(5);
    if constexpr (NR > 2) _tile_zero(6);
    for (int64_t k = 0; k < G; k += chunk) {
      _tile_loadd(0, q + g * G + k, K);
      _tile_loadd(1, w + 16 * k, 64);
      _tile_dpbsud(4, 0, 1);
      if constexpr (NR > 1) {
        _tile_loadd(2, w + stride + 16 * k, 64);
        _tile_dpbsud(5, 0, 2);
      }
      if constexpr (NR > 2) {
        _tile_loadd(3, w + 2 * stride + 16 * k, 64);
        _tile_dpbsud(6, 0, 3);
      }
    }
    _tile_stored(4, dots[0], 64);
    if constexpr (NR > 1) _tile_stored(5, dots[1], 64);
    if constexpr (NR > 2) _tile_stored(6, dots[2], 64);
    __m512 swv[NR], sov[NR];
    for (int j = 0; j < NR; ++j) {
      swv[j] = unit_scales16(sw + g * ldy + 16 * j, cols - 16 * j);
      if (so) sov[j] = unit_scales16(so + g * ldy + 16 * j, cols - 16 * j);
    }
    for (int i = 0; i < rows; ++i) {  // units_tile's order: each group's product, then its offset term
      const __m512i start = _mm512_set1_epi32(zero8 * starts[i * groups + g]);
      const __m512 s = _mm512_set1_ps(sx[i * groups + g]);
      const __m512 gs = so ? _mm512_set1_ps(group_sum(sx, starts, i * groups + g)) : _mm512_setzero_ps();
      for (int j = 0; j < NR; ++j) {
        float* a = acc + i * 48 + 16 * j;
        const __m512i dot = _mm512_add_epi32(_mm512_load_si512(dots[j][i]), start);
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(swv[j], s), _mm512_loadu_ps(a));
        if (so) v = _mm512_fmadd_ps(sov[j], gs, v);
        _mm512_storeu_ps(a, v);
      }
    }
  }
}
constexpr decltype(&amx_units_groups<1>) AMX_UNIT_GROUPS[3] = {amx_units_groups<1>, amx_units_groups<2>,
                                                               amx_units_groups<3>};
// Nibble units are expanded to bytes this many groups at a time, into a buffer that stays in L1 while the tiles
// read it (whole units expanded first, 43-233 KB for three, stalled on their stores: 40 % of gate/up's time).
constexpr int64_t AMX_EXPAND_GROUPS = 8;

// From 8 rows of x, where the tiles are granted, and for groups of 32 values or more: a decode step of the demo
// model in a8 (profile_decode.py) 1.11-1.16x faster at 8 streams, 1.06-1.14x at 16 and 32; with byte units on the
// tiles from 5 rows, 0.87-0.92x at 5 streams. Q6_K's groups of 16 (0.8-1.05x on the tiles) stay on the vectors.
constexpr int64_t AMX_UNITS_ROWS = 8;
bool amx_units_take(int64_t rows, int64_t G, int64_t planes) {
  if (!amx_units || rows < AMX_UNITS_ROWS || G < 32 || (G > 64 && (G % 64 || planes >= 0))) return false;
  return qe_amx::tiles_granted();
}

// Units begin..end (unit_bytes each, nibble units with `planes` >= 0) against rows m0..m1 of x on the tiles, three
// units at a time; y, N, sw, so, bias as int8_linear_units has them.
void amx_units_range(const uint8_t* w, int64_t unit_bytes, int planes, int64_t begin, int64_t end, int64_t m0,
                     int64_t m1, const int8_t* q, const int32_t* starts, const float* sx, int64_t K, int64_t G,
                     float* y, int64_t N, const float* sw, const float* so, const float* bias, int zero8) {
  const int64_t groups = K / G, chunk = std::min<int64_t>(G, 64);
  const int64_t block = AMX_EXPAND_GROUPS, blocks = (groups + block - 1) / block, group_bytes = G * (8 + 2 * planes);
  alignas(64) uint8_t expanded[3 * AMX_EXPAND_GROUPS * 16 * 64];
  const int64_t tiles = (m1 - m0 + 15) / 16;
  thread_local std::vector<float> sums;
  sums.resize((m1 - m0) * 48);
  int configured = 0;
  for (int64_t u = begin; u < end; u += 3) {
    const int nr = static_cast<int>(std::min<int64_t>(3, end - u));
    const int cols = static_cast<int>(std::min<int64_t>(16 * nr, N - u * 16));
    std::fill(sums.begin(), sums.end(), 0.0f);
    // the next three units into L2, a few lines at each group and tile of rows: the weights stream from memory,
    // and without this the tiles lost to the vector tiles in a decode step (0.8-0.9x at 8 streams; a burst at
    // each block of groups: even at 32 streams, still 0.9x at 8)
    const char* next = reinterpret_cast<const char*>(w + (u + 3) * unit_bytes);
    const int64_t next_lines = u + 3 < end ? std::min<int64_t>(3, end - u - 3) * unit_bytes / 64 : 0;
    for (int64_t g0 = 0; g0 < groups; g0 += block) {
      const int64_t g1 = std::min(groups, g0 + block);
      const uint8_t* wg = w + u * unit_bytes + g0 * 16 * G;
      int64_t stride = unit_bytes;
      if (planes >= 0) {
        for (int j = 0; j < nr; ++j)
          EXPAND_NIBBLES[planes](w + (u + j) * unit_bytes + g0 * group_bytes, (g1 - g0) * G, G,
                                 expanded + j * block * 16 * G);
        wg = expanded, stride = block * 16 * G;
      }
      for (int64_t m = m0, t = 0; m < m1; m += 16, ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(16, m1 - m));
        if (rows != configured) configure_units(configured = rows, chunk);
        AMX_UNIT_GROUPS[nr - 1](wg, stride, q + m * K, starts + m * groups, sx + m * groups, K, G, chunk, rows, g0,
                                g1, N, sw + u * 16, so ? so + u * 16 : nullptr, cols, zero8,
                                sums.data() + (m - m0) * 48, t == 0, next, next_lines,
                                ((g0 / block) * tiles + t) * block, blocks * tiles * block);
      }
    }
    for (int64_t m = m0; m < m1; ++m)
      for (int j = 0; j < nr; ++j)
        store_unit16(_mm512_loadu_ps(sums.data() + (m - m0) * 48 + 16 * j), y + m * N + u * 16 + 16 * j,
                     bias ? bias + u * 16 + 16 * j : nullptr, cols - 16 * j);
  }
  if (configured) _tile_release();
}
#endif
#else
constexpr int64_t UNIT_ROWS = 8;

inline __m256i first_lanes(int cols) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One group's weight scales of a unit's 8 outputs (zeros past `cols`: the last unit of a weight is padded).
inline __m256 unit_scales(const float* sw, int cols) {
  return cols >= 8 ? _mm256_loadu_ps(sw) : _mm256_maskload_ps(sw, first_lanes(cols));
}

// y[0..cols) = acc + bias for one unit's 8 outputs (cols < 8 in the last unit of a weight).
inline void store_unit(__m256 acc, float* y, const float* bias, int cols) {
  if (cols >= 8) {
    _mm256_storeu_ps(y, bias ? _mm256_add_ps(acc, _mm256_loadu_ps(bias)) : acc);
  } else if (cols > 0) {
    const __m256i mask = first_lanes(cols);
    _mm256_maskstore_ps(y, mask, bias ? _mm256_add_ps(acc, _mm256_maskload_ps(bias, mask)) : acc);
  }
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

inline __m256 max_abs8(__m256 amax, const float* x) {
  return _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(x)));
}

// 8 values x / d rounded half to even (as torch.round, the reference in models/w8a8.py), clamped to ±127.
inline __m256i quantized8(const float* x, __m256 d) {
  const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
}

// 16 int32 lanes (a, then b) → 16 bytes in order: signed (within ±127) or unsigned (within 0..255).
template <bool Unsigned>
inline void store16(__m256i a, __m256i b, void* dst) {
  const __m256i words = _mm256_packs_epi32(a, b);  // per 128-bit half: a's 4, then b's 4
  const __m256i bytes = Unsigned ? _mm256_packus_epi16(words, words) : _mm256_packs_epi16(words, words);
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5));
  _mm_storeu_si128(static_cast<__m128i*>(dst), _mm256_castsi256_si128(ordered));
}

// quantize_group (as the AVX-512 one above) on 8 lanes.
float quantize_group(const float* x, int64_t G, int8_t* q, int32_t& sum) {
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; k += 8) amax = max_abs8(amax, x + k);
  const float scale = hmax8(amax) / 127.0f;
  const __m256 d = _mm256_set1_ps(scale > 0.0f ? scale : 1.0f);
  __m256i sums = _mm256_setzero_si256();
  for (int64_t k = 0; k < G; k += 16) {
    const __m256i lo = quantized8(x + k, d), hi = quantized8(x + k + 8, d);
    sums = _mm256_add_epi32(sums, _mm256_add_epi32(lo, hi));
    store16<false>(lo, hi, q + k);
  }
  sum = hsum8i(sums);
  return scale;
}

// One group of G weights → G bytes int8 + 128; returns the group's scale.
float quantize_weight_group(const float* row, int64_t G, uint8_t* dst) {
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; k += 8) amax = max_abs8(amax, row + k);
  const float scale = hmax8(amax) / 127.0f;
  const __m256 d = _mm256_set1_ps(scale > 0.0f ? scale : 1.0f);
  const __m256i offset = _mm256_set1_epi32(128);
  for (int64_t k = 0; k < G; k += 16)
    store16<true>(_mm256_add_epi32(quantized8(row + k, d), offset),
                  _mm256_add_epi32(quantized8(row + k + 8, d), offset), dst + k);
  return scale;
}


// The AVX2 layout of the weights (models/w8a8.py: pack_units): units of 8 rows, each [K / 4][row][k % 4] as
// signed bytes, so one 32-byte load is 4 values of 8 rows. Against 4 values of a row of x broadcast to every
// lane, each lane of an accumulator is one output: no sums across lanes, and a group's integers are scaled
// with one convert and one FMA for 8 outputs. An earlier tile of whole weight rows spent its time on those (4
// steps of 32 bytes a group of 128, then 8 conversions, FMAs and sums across lanes); this one ran 1.4x faster in
// a loop on cached data (70 against 51 G multiply-adds/s on one Zen 3 core).
//
// y[i, 0..cols) = (products of row i of q (and a = |q|) with the NR units at wu) + bias, for MR rows of q; sw, ahead,
// fetch and fetch_lines as in the AVX-512 units_tile.
template <int MR, int NR>
void units_tile(const uint8_t* wu, const int8_t* q, const uint8_t* a, const int32_t* starts, const float* sx,
                int64_t K, int64_t G, float* y, int64_t ldy, const float* sw, const float* so, const float* bias,
                int cols, int, bool ahead, const char* fetch, int64_t fetch_lines, bool) {
  const int64_t groups = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_share(fetch, fetch_lines, g, groups);
    __m256i dot[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) dot[i][j] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
      __m256i wv[NR];
      for (int j = 0; j < NR; ++j) {
        const uint8_t* w = wu + j * 8 * K + k * 8;
        if (ahead && k % 8 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH), _MM_HINT_T1);
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      }
      for (int i = 0; i < MR; ++i) {
        int32_t xs, as;
        std::memcpy(&xs, q + i * K + k, 4);
        std::memcpy(&as, a + i * K + k, 4);
        const __m256i xb = _mm256_set1_epi32(xs), ab = _mm256_set1_epi32(as);
        for (int j = 0; j < NR; ++j)
          dot[i][j] = _mm256_add_epi32(dot[i][j],
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(wv[j], xb)), ones));
      }
    }
    __m256 swv[NR];
    for (int j = 0; j < NR; ++j) swv[j] = unit_scales(sw + g * ldy + 8 * j, cols - 8 * j);
    for (int i = 0; i < MR; ++i) {
      const __m256 s = _mm256_set1_ps(sx[i * groups + g]);
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i][j]), _mm256_mul_ps(swv[j], s), acc[i][j]);
    }
    if (so) {  // weight offsets (the a8 mode's K-quants), as in the AVX-512 tile
      for (int j = 0; j < NR; ++j) swv[j] = unit_scales(so + g * ldy + 8 * j, cols - 8 * j);
      for (int i = 0; i < MR; ++i) {
        const __m256 s = _mm256_set1_ps(group_sum(sx, starts, i * groups + g));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(swv[j], s, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      store_unit(acc[i][j], y + i * ldy + 8 * j, bias ? bias + 8 * j : nullptr, cols - 8 * j);
}
#endif

// From this many tiles of rows of x, each tile prefetches a slice of the next units, a few lines a group (below);
// with one tile (decode of 1-2 rows) its loop prefetches ahead in the stream. profile_decode.py --quantization
// w8a8, context 100, pairs against the stream prefetch alone: 8 streams 48.0 / 53.0 and 44.5 / 49.5 ms a step,
// 16 and 32 streams within the host's noise. (Whole slices at the start of each tile were slower: 56 / 50 ms.)
constexpr int64_t SPREAD_TILES = 2;

// units_tile(wu, q, |q| (AVX2), starts, sx, K, G, y, ldy, sw, offsets, bias, cols, zero8, ahead, fetch, fetch_lines,
// stream)
using UnitsFn = void (*)(const uint8_t*, const int8_t*, const uint8_t*, const int32_t*, const float*, int64_t, int64_t,
                        float*, int64_t, const float*, const float*, const float*, int, int, bool, const char*,
                        int64_t, bool);

// From this many bytes of y (the LM head over 7 rows of x or more, a prefill's gate/up), the tiles store y with
// non-temporal stores (AVX-512): y's lines are not read from memory first only to be overwritten, and they do not
// push the weights out of the caches. The LM head at 32 rows of x (19 MB of y) ran 0.90x the time, the same as
// with no stores at all; at 16 rows 0.88-0.91x, at 8 0.93x (forty-fifth pass in benchmarks.md).
constexpr int64_t STREAM_Y_BYTES = int64_t{4} << 20;
#if QE_INT8 == 512
// 12 integer and 12 float accumulators, 3 weight vectors and x: 28 of the 32 registers
constexpr int UMR = 4, UNR = 3;
constexpr UnitsFn UNIT_TILES[UMR][UNR] = {
    {units_tile<-1, 1, 1>, units_tile<-1, 1, 2>, units_tile<-1, 1, 3>},
    {units_tile<-1, 2, 1>, units_tile<-1, 2, 2>, units_tile<-1, 2, 3>},
    {units_tile<-1, 3, 1>, units_tile<-1, 3, 2>, units_tile<-1, 3, 3>},
    {units_tile<-1, 4, 1>, units_tile<-1, 4, 2>, units_tile<-1, 4, 3>},
};

// The nibble units' tiles: the same sizes, per count of bit planes
#define QE_NIBBLE_ROW(P, MR) {units_tile<P, MR, 1>, units_tile<P, MR, 2>, units_tile<P, MR, 3>}
#define QE_NIBBLE_PLANES(P) \
  {QE_NIBBLE_ROW(P, 1), QE_NIBBLE_ROW(P, 2), QE_NIBBLE_ROW(P, 3), QE_NIBBLE_ROW(P, 4)}
constexpr UnitsFn NIBBLE_TILES[2][UMR][UNR] = {QE_NIBBLE_PLANES(0), QE_NIBBLE_PLANES(1)};
#undef QE_NIBBLE_PLANES
// 5-8 rows of x (a few sequences decoding together) in one tile a unit wide: 8 integer and 8 float accumulators.
// Two tiles of 4 would unpack each unit twice, and expanding it first cost 13 % of the step at 8 streams.
constexpr int WIDE_ROWS = 8;
#define QE_WIDE_NIBBLES(P) {units_tile<P, 5, 1>, units_tile<P, 6, 1>, units_tile<P, 7, 1>, units_tile<P, 8, 1>}
constexpr UnitsFn WIDE_NIBBLE_TILES[2][WIDE_ROWS - UMR] = {QE_WIDE_NIBBLES(0), QE_WIDE_NIBBLES(1)};
#undef QE_WIDE_NIBBLES
#undef QE_NIBBLE_ROW
#else
// 6 integer accumulators, 3 weight vectors, x and |x| broadcast: 12 of the 16 registers (the float sums spill)
constexpr int UMR = 2, UNR = 3;
constexpr UnitsFn UNIT_TILES[UMR][UNR] = {
    {units_tile<1, 1>, units_tile<1, 2>, units_tile<1, 3>},
    {units_tile<2, 1>, units_tile<2, 2>, units_tile<2, 3>},
};
#endif

// Rows of x are taken this many at a time, so their bytes stay in L2 while every weight row passes by.
constexpr int64_t ROW_CHUNK = 256;

// x [M, Kx] (rows ldx apart) → q [M, K] int8, scales [M, K / G] (max |x| / 127 per group) and lane starts
// [M, K / G]: -8 * sum(q), from which the kernels take off the weights' +128: the VNNI units tile and AMX start
// each output at 16x that (the AVX2 kernel has none to take off and does not read them). Columns Kx..K (the
// weight's padding to a multiple of 64) quantise as zeros, so x need not be padded (a copy as large as x).
// With `factors` (Kx floats; the layer's smoothing, models/w8a8.py), x's columns are multiplied by them first.
constexpr int64_t MAX_GROUP = 512;
void quantize_rows(const float* x, int64_t Kx, int64_t ldx, int64_t M, int64_t K, int64_t G, const float* factors,
                   int8_t* q, float* scales, int32_t* starts) {
  const int64_t groups = K / G, blocks = (groups + 15) / 16;
  // groups wholly within x and unscaled go 16 at a time (AVX-512: quantize_groups16), the rest (the padding past
  // Kx, smoothed x) one by one
  const int64_t whole = QE_INT8 == 512 && !factors ? Kx / G : 0;
  at::parallel_for(0, M * blocks, 4, [&](int64_t a, int64_t b) {
    alignas(64) float padded[MAX_GROUP];
    for (int64_t block = a; block < b; ++block) {
      const int64_t row = block / blocks, g0 = (block % blocks) * 16, g1 = std::min(groups, g0 + 16);
      int64_t g = g0;
#if QE_INT8 == 512
      if (g0 < whole) {
        g = std::min(g1, whole);
        quantize_groups16(x + row * ldx + g0 * G, G, static_cast<int>(g - g0), q + row * K + g0 * G,
                          scales + row * groups + g0, starts + row * groups + g0);
      }
#endif
      for (; g < g1; ++g) {
        const int64_t i = row * groups + g, column = g * G;
        const float* values = x + row * ldx + column;
        if (column + G > Kx || factors) {
          const int64_t real = std::min(G, std::max<int64_t>(0, Kx - column));
          if (factors)
            for (int64_t k = 0; k < real; ++k) padded[k] = values[k] * factors[column + k];
          else
            std::copy(values, values + real, padded);
          std::fill(padded + real, padded + G, 0.0f);
          values = padded;
        }
        int32_t sum;
        scales[i] = quantize_group(values, G, q + row * K + column, sum);
        starts[i] = -8 * sum;
      }
    }
  });
}

}  // namespace

// Weight rows float32 [N, K] → (uint8 [N, K] = int8 + 128, scales [N, K / group]): max |w| / 127 per group of
// `group` values along each row, w / scale rounded half to even (models/w8a8.py: quantize_weight is the reference).
std::vector<at::Tensor> int8_quantize_weight(const at::Tensor& w, int64_t group) {
  TORCH_CHECK(w.dtype() == at::kFloat && w.dim() == 2 && w.device().is_cpu(), "w must be CPU float32 [N, K]");
  TORCH_CHECK(group > 0 && group % 16 == 0 && w.size(1) % group == 0, "group must be a multiple of 16 dividing K");
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), groups = K / group;
  auto out = at::empty({N, K}, at::dtype(at::kByte));
  auto scales = at::empty({N, groups}, at::dtype(at::kFloat));
  const float* src = wc.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < groups; ++g)
        sp[r * groups + g] = quantize_weight_group(src + r * K + g * group, group, dst + r * K + g * group);
  });
  return {out, scales};
}

namespace {
// Checks the weight scales [K / group, N] and the bias of an N-row weight; the bias pointer (nullptr without one).
const float* checked_bias(const at::Tensor& weight_scales, const c10::optional<at::Tensor>& bias, int64_t N,
                          int64_t K, int64_t group) {
  TORCH_CHECK(group > 0 && K % group == 0, "group must divide K");
  const int64_t groups = K / group;
  TORCH_CHECK(weight_scales.dtype() == at::kFloat && weight_scales.is_contiguous() && weight_scales.dim() == 2 &&
                  weight_scales.size(0) == groups && weight_scales.size(1) == N,
              "weight scales must be contiguous float32 [", groups, ", ", N, "] (per group, per output)");
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
              "bias must be contiguous float32 [N]");
  return bias->data_ptr<float>();
}
}  // namespace

namespace {
// x [M, Kx ≤ K] (times `factors` [Kx], if given) quantised as if padded with zeros to K columns: (q [M, K],
// scales, lane starts).
std::vector<at::Tensor> quantize_padded(const at::Tensor& x, int64_t K, int64_t group,
                                        const c10::optional<at::Tensor>& factors) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.device().is_cpu(), "x must be CPU float32 [M, K]");
  TORCH_CHECK(group > 0 && group % 16 == 0 && group <= MAX_GROUP && K % group == 0,
              "group must be a multiple of 16 dividing K, at most ", MAX_GROUP);
  TORCH_CHECK(x.size(1) <= K && x.size(1) > K - 64, "x has ", x.size(1), " columns; the weight has ", K,
              " (x may lack only the padding to a multiple of 64)");
  TORCH_CHECK(!factors.has_value() || (factors->dtype() == at::kFloat && factors->is_contiguous() &&
                                       factors->device().is_cpu() && factors->numel() == x.size(1)),
              "input factors must be contiguous CPU float32 [", x.size(1), "]");
  // rows apart are read where they lie (the decode step's down projection takes the first half of gate/up's
  // rows: a copy of them was ~2 % of a 32-stream a8 step)
  const auto xc = x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
  const int64_t M = xc.size(0);
  auto q = at::empty({M, K}, at::dtype(at::kChar));
  auto scales = at::empty({M, K / group}, at::dtype(at::kFloat));
  auto starts = at::empty({M, K / group}, at::dtype(at::kInt));
  quantize_rows(xc.data_ptr<float>(), xc.size(1), xc.stride(0), M, K, group,
                factors ? factors->data_ptr<float>() : nullptr, q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                starts.data_ptr<int32_t>());
  return {q, scales, starts};
}
}  // namespace

std::vector<at::Tensor> int8_quantize(const at::Tensor& x, int64_t group,
                                      const c10::optional<at::Tensor>& factors) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  return quantize_padded(x, x.size(1), group, factors);
}

// y = x @ W^T (+ bias) with the weight in the units layout (units_tile above): `packed` holds N / UNIT_ROWS units
// (rounded up) of UNIT_ROWS rows, int8 + 128, scaled per group by weight_scales [K / group, N]; x is quantised to
// int8 in groups of `group`. x may lack the weight's padding columns (K, a multiple of 64, is the packed weight's).
// With planes >= 0 (AVX-512 only) the units are nibble units (nibble_pair above) of codes whose weight 0 is `zero`.
at::Tensor int8_linear_units(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                             const at::Tensor& weight_scales, const c10::optional<at::Tensor>& bias,
                             int64_t group, const c10::optional<at::Tensor>& factors,
                             const c10::optional<at::Tensor>& offsets, int64_t planes, int64_t zero) {
#if QE_INT8
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  constexpr int64_t R = UNIT_ROWS;
  TORCH_CHECK(planes >= -1 && planes <= 1, "nibble units have 0 or 1 bit plane (-1: a byte a weight)");
  TORCH_CHECK(planes < 0 || QE_INT8 == 512, "nibble units need AVX-512 VNNI");
  TORCH_CHECK(planes < 0 ? zero == 128 : (zero >= 0 && zero % 8 == 0 && zero < (16 << planes)),
              "zero must be 128 for bytes, a multiple of 8 within the codes for nibbles");
  TORCH_CHECK(planes < 0 || group % 8 == 0, "nibble units take groups of a multiple of 8 values");
  // bytes of a unit's weight row, eighths: 8 (bytes) or 4 + planes (nibbles and bit planes)
  const int64_t eighths = planes < 0 ? 8 : 4 + planes;
  const int64_t units = (N + R - 1) / R, K = packed.numel() * 8 / std::max<int64_t>(1, units * R * eighths);
  TORCH_CHECK(packed.dtype() == at::kByte && packed.is_contiguous() && K % 64 == 0 &&
                  packed.numel() * 8 == units * R * K * eighths,
              "packed weight must be contiguous uint8 of ", units * R, " rows of a multiple of 64 weights");
  const float* bias_ptr = checked_bias(weight_scales, bias, N, K, group);
  TORCH_CHECK(!offsets.has_value() || (offsets->dtype() == at::kFloat && offsets->is_contiguous() &&
                                       offsets->sizes() == weight_scales.sizes()),
              "weight offsets must be contiguous float32 shaped as the weight scales");
  const float* so = offsets.has_value() ? offsets->data_ptr<float>() : nullptr;
  const auto parts = quantize_padded(x, K, group, factors);
  // |q| <= 127: the unsigned operand of AVX2's vpmaddubsw (VNNI reads starts instead)
  const auto magnitudes = QE_INT8 == 256 ? parts[0].abs() : parts[0];
  const int64_t M = x.size(0), groups = K / group;
  auto y = at::empty({M, N}, at::dtype(at::kFloat));
  const bool stream = QE_INT8 == 512 && M * N * 4 >= STREAM_Y_BYTES;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int8_t* q = parts[0].data_ptr<int8_t>();
  const uint8_t* a = reinterpret_cast<const uint8_t*>(magnitudes.data_ptr<int8_t>());
  const int32_t* starts = parts[2].data_ptr<int32_t>();
  const float* sx = parts[1].data_ptr<float>();
  const float* sw = weight_scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += ROW_CHUNK) {
    const int64_t m1 = std::min(M, m0 + ROW_CHUNK);
    // A thread streams a long stretch of units, each pass over UNR of them serving every row of x. The units are
    // shared out evenly: blocks of UNR units handed out in chunks left down's 56 units (N = 896) split 30 / 26
    // between two threads, and down ran at 1.6x one thread's speed instead of 2x (thirty-second pass).
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), units);
    const int64_t unit_bytes = R * K * eighths / 8;
#if QE_INT8 == 512 && QE_AMX
    const bool on_tiles = amx_units_take(m1 - m0, group, planes);
#endif
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      const int64_t begin = units * p0 / parts, end = units * p1 / parts, tiles = (m1 - m0 + UMR - 1) / UMR;
#if QE_INT8 == 512 && QE_AMX
      if (on_tiles) {
        amx_units_range(w, unit_bytes, static_cast<int>(planes), begin, end, m0, m1, q, starts, sx, K, group, yp,
                        N, sw, so, bias_ptr, static_cast<int>(zero / 8));
        return;
      }
#endif
#if QE_INT8 == 512
      if (planes >= 0 && m1 - m0 > UMR && m1 - m0 <= WIDE_ROWS) {
        for (int64_t u = begin; u < end; ++u)
          WIDE_NIBBLE_TILES[planes][m1 - m0 - UMR - 1](
              w + u * unit_bytes, q + m0 * K, a + m0 * K, starts + m0 * groups, sx + m0 * groups, K, group,
              yp + m0 * N + u * R, N, sw + u * R, so ? so + u * R : nullptr, bias_ptr ? bias_ptr + u * R : nullptr,
              static_cast<int>(std::min<int64_t>(R, N - u * R)), static_cast<int>(zero / 8), true, nullptr, 0,
              stream);
        if (stream) _mm_sfence();
        return;
      }
#endif
      // nibble units over several tiles of rows: expanded to byte units once (expand_nibbles), into a buffer
      // each pool thread keeps (a fresh one of down's 233 KB was mapped, faulted in and zeroed at every call)
      uint8_t* expanded = nullptr;
#if QE_INT8 == 512
      thread_local std::unique_ptr<uint8_t[]> buffer;
      thread_local int64_t buffer_size = 0;
      if (planes >= 0 && tiles > 1) {
        if (buffer_size < UNR * R * K) buffer.reset(new uint8_t[buffer_size = UNR * R * K]);
        expanded = buffer.get();
      }
#endif
      for (int64_t u = begin; u < end; u += UNR) {
        const int nr = static_cast<int>(std::min<int64_t>(UNR, end - u));
#if QE_INT8 == 512
        if (expanded)
          for (int j = 0; j < nr; ++j)
            EXPAND_NIBBLES[planes](w + (u + j) * unit_bytes, K, group, expanded + j * R * K);
#endif
        // The weights stream from memory: while the tiles of rows work on these units, they fetch the next ones.
        const char* next = reinterpret_cast<const char*>(w + (u + UNR) * unit_bytes);
        const int64_t next_lines = u + UNR < end ? std::min<int64_t>(UNR, end - u - UNR) * unit_bytes / 64 : 0;
        // ... and the next units' scales (and offsets), a row of N floats apart from group to group, where the
        // hardware prefetchers do not follow: the LM head at 8 rows of x 0.93x the time (three runs on Zen 4),
        // the other products and more rows within 2 % (benchmarks.md, forty-fourth pass).
        if (tiles >= SPREAD_TILES && next_lines)
          for (int64_t g = 0; g < groups; ++g)
            for (int64_t j = u + UNR; j < std::min(end, u + 2 * UNR); ++j) {
              _mm_prefetch(reinterpret_cast<const char*>(sw + g * N + j * R), _MM_HINT_T0);
              if (so) _mm_prefetch(reinterpret_cast<const char*>(so + g * N + j * R), _MM_HINT_T0);
            }
        for (int64_t m = m0, t = 0; m < m1; m += UMR, ++t) {
          const int mr = static_cast<int>(std::min<int64_t>(UMR, m1 - m));
          const bool spread = tiles >= SPREAD_TILES;
          const int64_t l0 = spread ? t * next_lines / tiles : 0, l1 = spread ? (t + 1) * next_lines / tiles : 0;
          // byte units (zero 128), nibble units, or nibble units expanded to bytes (already in cache)
          UnitsFn tile = UNIT_TILES[mr - 1][nr - 1];
          const uint8_t* weights = w + u * unit_bytes;
          bool ahead = t == 0 && !spread;
#if QE_INT8 == 512
          if (expanded)
            weights = expanded, ahead = false;
          else if (planes >= 0)
            tile = NIBBLE_TILES[planes][mr - 1][nr - 1];
#endif
          tile(weights, q + m * K, a + m * K, starts + m * groups, sx + m * groups, K, group, yp + m * N + u * R, N,
               sw + u * R, so ? so + u * R : nullptr, bias_ptr ? bias_ptr + u * R : nullptr,
               static_cast<int>(std::min<int64_t>(R * nr, N - u * R)), static_cast<int>(zero / 8), ahead,
               next + l0 * 64, l1 - l0, stream);
        }
      }
      if (stream) _mm_sfence();  // the streamed lines visible before the pool's barrier hands y on
    });
  }
  return y;
#else
  (void)x, (void)packed, (void)N, (void)weight_scales, (void)bias, (void)group, (void)factors, (void)offsets;
  (void)planes, (void)zero;
  TORCH_CHECK(false, "this build has no int8 kernels");
#endif
}

namespace {
#if QE_AMX
// AMX (Sapphire Rapids and later): a tile instruction multiplies 16 rows of x by 16 weight rows over 64 bytes
// (16K multiply-adds). Linux hands out the tile registers only on request, once per process.
bool amx_usable() { return qe_amx::tiles_granted(); }

// Tiles: 0, 1 = y (int32, two blocks of 16 columns), 2 = x (rows of int8), 3, 4 = the two weight blocks.
// (Tried without gain on this machine: 2 x 2 blocking over all eight tiles, and two y pairs used in turn so
// the next group's products overlap this group's scaling. Large products reach 200-300 G multiply-adds/s
// either way, 2.5-3.5x float32; why not more is not understood yet.)
void configure(int rows) {
  qe_amx::TileConfig c;
  for (int t : {0, 1}) c.rows[t] = static_cast<uint8_t>(rows), c.colsb[t] = 64;
  c.rows[2] = static_cast<uint8_t>(rows), c.colsb[2] = 64;
  for (int t : {3, 4}) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// The weights are prefetched into L2 this far ahead of the tile loads (the units lie one after another, so this
// runs on into the next unit): tile loads alone streamed the weights at ~11-13 GB/s where the memory gives ~17.
constexpr int64_t AHEAD = 16384;

// Group g of the rows of x at q against one unit's packed weights wu, into y tiles 0 and 1; `ahead`: prefetch
// (on the unit's first tile of rows; the others find its weights in cache).
inline void products(const int8_t* q, const uint8_t* wu, int64_t K, int64_t g, int64_t G, bool ahead) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t c = g * G / 64; c < (g + 1) * G / 64; ++c) {
    if (ahead)
      for (int line = 0; line < 2048; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wu + c * 2048 + AHEAD + line), _MM_HINT_T1);
    _tile_loadd(2, q + c * 64, K);
    _tile_loadd(3, wu + c * 2048, 64);
    _tile_loadd(4, wu + c * 2048 + 1024, 64);
    _tile_dpbsud(0, 2, 3);
    _tile_dpbsud(1, 2, 4);
  }
}

// Weights packed for the tiles (models/w8a8.py: pack_amx): for each unit of 32 output rows and each 64-byte
// stretch of K, two 1 KiB tiles (rows 0-15, then 16-31), each [k / 4][row][k % 4].
void amx_linear(const uint8_t* packed, int64_t N, int64_t K, int64_t G, const int8_t* q, const float* sx,
                const int32_t* starts, int64_t M, const float* sw, const float* bias, float* y) {
  const int64_t groups = K / G, chunks = K / 64, units = (N + 31) / 32;
  // Rows of x are taken ROW_CHUNK at a time (their bytes stay in L2 while every weight unit passes by); each
  // thread takes whole units of 32 weight rows.
  for (int64_t c0 = 0; c0 < M; c0 += ROW_CHUNK) {
    const int64_t c1 = std::min(M, c0 + ROW_CHUNK);
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      alignas(64) int32_t dots[16 * 32];
      alignas(64) float acc[16 * 32];
      int configured = 0;
      for (int64_t u = u0; u < u1; ++u) {
        const uint8_t* wu = packed + u * chunks * 2048;
        for (int64_t m0 = c0; m0 < c1; m0 += 16) {
          const int rows = static_cast<int>(std::min<int64_t>(16, c1 - m0));
          if (rows != configured) configure(configured = rows);
          std::fill(acc, acc + rows * 32, 0.0f);
          const int64_t n0 = u * 32;
          __mmask16 masks[2];
          for (int h = 0; h < 2; ++h) {
            const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(16, N - n0 - 16 * h));
            masks[h] = static_cast<__mmask16>((1u << cols) - 1);
          }
          for (int64_t g = 0; g < groups; ++g) {
            products(q + m0 * K, wu, K, g, G, m0 == c0);
            _tile_stored(0, dots, 128);
            _tile_stored(1, dots + 16, 128);
            const __m512 sw_g[2] = {_mm512_maskz_loadu_ps(masks[0], sw + g * N + n0),
                                    _mm512_maskz_loadu_ps(masks[1], sw + g * N + n0 + 16)};
            for (int r = 0; r < rows; ++r) {
              const int64_t i = (m0 + r) * groups + g;
              const __m512i start = _mm512_set1_epi32(16 * starts[i]);  // -128 * sum(q): the weights' +128
              const __m512 s = _mm512_set1_ps(sx[i]);
              for (int h = 0; h < 2; ++h) {
                const __m512i v = _mm512_add_epi32(_mm512_load_si512(dots + r * 32 + 16 * h), start);
                float* a = acc + r * 32 + 16 * h;
                _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(sw_g[h], s),
                                                   _mm512_load_ps(a)));
              }
            }
          }
          for (int h = 0; h < 2; ++h) {
            if (!masks[h]) break;
            const __m512 add = bias ? _mm512_maskz_loadu_ps(masks[h], bias + n0 + 16 * h) : _mm512_setzero_ps();
            for (int r = 0; r < rows; ++r)
              _mm512_mask_storeu_ps(y + (m0 + r) * N + n0 + 16 * h, masks[h],
                                    _mm512_add_ps(_mm512_load_ps(acc + r * 32 + 16 * h), add));
          }
        }
      }
      if (configured) _tile_release();
    });
  }
}
#endif
}  // namespace

at::Tensor int8_linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                           const at::Tensor& weight_scales, const c10::optional<at::Tensor>& bias,
                           int64_t group, const c10::optional<at::Tensor>& factors) {
#if QE_AMX
  TORCH_CHECK(amx_usable(), "AMX is not available to this process");
  TORCH_CHECK(group % 64 == 0, "AMX tiles take groups of a multiple of 64 values");
  const int64_t rows = (N + 31) / 32 * 32, K = packed.numel() / rows;
  TORCH_CHECK(packed.dtype() == at::kByte && packed.is_contiguous() && K % 64 == 0 && packed.numel() == rows * K,
              "packed weight must be contiguous uint8 of ", rows, " rows of a multiple of 64 bytes");
  const float* bias_ptr = checked_bias(weight_scales, bias, N, K, group);
  const auto parts = quantize_padded(x, K, group, factors);
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, at::dtype(at::kFloat));
  amx_linear(packed.data_ptr<uint8_t>(), N, K, group, parts[0].data_ptr<int8_t>(), parts[1].data_ptr<float>(),
             parts[2].data_ptr<int32_t>(), M, weight_scales.data_ptr<float>(), bias_ptr, y.data_ptr<float>());
  return y;
#else
  (void)x, (void)packed, (void)N, (void)weight_scales, (void)bias, (void)group, (void)factors;
  TORCH_CHECK(false, "this build has no AMX kernels");
#endif
}

#endif  // QE_INT8

// Whether the units take the AMX tiles from AMX_UNITS_ROWS rows of x (where they are granted); returns the
// previous setting (always false without AMX kernels). Tests switch it to compare the two.
bool set_int8_amx_units(bool on) {
#if QE_INT8 == 512 && QE_AMX
  const bool was = amx_units;
  amx_units = on;
  return was;
#else
  (void)on;
  return false;
#endif
}

// In every build: DecodeStep::set_int8 asks it, and a module with an unresolved symbol does not load.
bool int8_has_amx() {
#if QE_INT8 && QE_AMX
  return amx_usable();
#else
  return false;
#endif
}
