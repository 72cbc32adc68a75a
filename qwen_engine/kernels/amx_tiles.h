// The tile loop of the AMX prefill product (amx_linear.cpp), apart from torch, so that
// benchmarks/amx_tiles.cpp times this very code.
#pragma once
#include <algorithm>
#include <cstdint>

#include "amx_linear.h"

#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>

namespace qe_amx {

constexpr int64_t PANEL = 32;  // weight rows per panel (two A tiles)

// Every tile 16 rows of 64 bytes.
inline void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// Forced inline: as an out-of-line call (GCC's choice) the scaled loop below ran at 0.76-0.86x.
__attribute__((always_inline)) inline void zero_products() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Adds block b's products into tiles 0-3: the panel's two weight tiles against the three x pieces of token
// groups x0 and x1.
__attribute__((always_inline)) inline void block_products(const uint16_t* q, const uint16_t* x0, const uint16_t* x1,
                                                          int64_t b) {
  _tile_loadd(4, q + b * PANEL * 32, 64);
  _tile_loadd(5, q + b * PANEL * 32 + 16 * 32, 64);
  for (int k = 0; k < 3; ++k) {
    _tile_loadd(6, x0 + (b * 3 + k) * 512, 64);
    _tile_loadd(7, x1 + (b * 3 + k) * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// acc [32 weight rows][32 tokens] = the panel (q, s, m) against token groups g, g + 1, over `blocks` blocks.
// q: [block][row][32] bfloat16 integers; s, m: [block][row]; pieces: [group][block][piece][16 value pairs]
// [16 tokens][2]; sums: [group][block][16 tokens].
// Tiles: 0-3 products (weight tile i, token group j at 2i + j), 4-5 weights, 6-7 x pieces. Each block's
// products are stored and scaled into acc row by row (per weight row: its scale, and its minimum times the
// tokens' sums); the stores and scaling cost about as much as the products.
inline void panel_products(const uint16_t* q, const float* s, const float* m, bool mins, const uint16_t* pieces,
                           const float* sums, int64_t blocks, int64_t g, float* acc) {
  alignas(64) float c[4][16][16];
  const uint16_t* x0 = pieces + g * blocks * 3 * 512;
  const uint16_t* x1 = x0 + blocks * 3 * 512;
  const float *sums0 = sums + g * blocks * 16, *sums1 = sums0 + blocks * 16;
  std::fill(acc, acc + 32 * 32, 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    zero_products();
    block_products(q, x0, x1, b);
    // Each tile is stored and scaled in turn: scaling the first overlaps the last products into the others.
    const auto scale_tile = [&](int t) {  // tile t: weight rows 16 (t / 2).., token group g + t % 2
      const float* sum = (t % 2 ? sums1 : sums0) + b * 16;
      for (int r = 16 * (t / 2); r < 16 * (t / 2) + 16; ++r) {
        float* a = acc + r * 32 + 16 * (t % 2);
        const __m512 scale = _mm512_set1_ps(s[b * PANEL + r]);
        __m512 v = _mm512_fmadd_ps(scale, _mm512_load_ps(c[t][r % 16]), _mm512_load_ps(a));
        if (mins) v = _mm512_fnmadd_ps(_mm512_set1_ps(m[b * PANEL + r]), _mm512_loadu_ps(sum), v);
        _mm512_store_ps(a, v);
      }
    };
    _tile_stored(0, c[0], 64);
    scale_tile(0);
    _tile_stored(1, c[1], 64);
    scale_tile(1);
    _tile_stored(2, c[2], 64);
    scale_tile(2);
    _tile_stored(3, c[3], 64);
    scale_tile(3);
  }
}

// The same for weights with no per-block scale (bfloat16 weights, w = q): the product tiles add up over all
// `blocks` blocks and are stored once, straight into acc; no scaling pass.
inline void panel_products_unscaled(const uint16_t* q, const uint16_t* pieces, int64_t blocks, int64_t g,
                                    float* acc) {
  const uint16_t* x0 = pieces + g * blocks * 3 * 512;
  const uint16_t* x1 = x0 + blocks * 3 * 512;
  zero_products();
  for (int64_t b = 0; b < blocks; ++b) block_products(q, x0, x1, b);
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  _tile_stored(2, acc + 16 * 32, 128);
  _tile_stored(3, acc + 16 * 32 + 16, 128);
}

}  // namespace qe_amx
#endif
