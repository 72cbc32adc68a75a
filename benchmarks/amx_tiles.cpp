// The tile loop of kernels/amx_linear.cpp alone (its own code, kernels/amx_tiles.h), and the forms it could
// take, on one core.
//
//     g++ -O3 -march=native -o /tmp/amx_tiles benchmarks/amx_tiles.cpp && /tmp/amx_tiles
//     taskset -c 0 /tmp/amx_tiles & taskset -c 1 /tmp/amx_tiles; wait     # both cores at once
//
// One weight panel (32 rows x 28 blocks of 32 values, as a 896-wide layer) against 192 tokens of x in three
// bfloat16 pieces (1 MiB, the kernel's L2 budget), in 2 x 2 product tiles. Printed: float32-equivalent
// multiply-adds per second (one float32 product = the tile products its form needs). Forms:
//   scaled   the kernel's: 3 tile products a block (x's pieces times the block's integers), then each product
//            tile stored and scaled into a float32 accumulator;
//   folded N the block scale folded into the weights, split into bfloat16 pieces, the tiles accumulating over
//            all of K with no scaling: 5 products for a 16-bit weight (Q5_0's d * q: two pieces; the product
//            of the two small pieces is left out), 6 for a 24-bit one (Q6_K, Q4_K: three pieces), 3 for a
//            weight that is bfloat16 already.
// Data: `const` fills everything with 1.0, `random` with random bfloat16 values (in one run the tiles ran
// slower on random data); `streamed` takes a different panel from memory (300 panels, beyond L2) for each
// pass, as the kernel does, instead of one panel that stays in L2. Not a test: nothing is asserted.

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../qwen_engine/kernels/amx_tiles.h"

namespace {

using qe_amx::PANEL;
constexpr int BLOCKS = 28, GROUPS = 12, PANELS = 300, PASSES = 200;

using Panel = uint16_t[3][BLOCKS][PANEL * 32];  // [weight piece][block][row][32 values]; piece 0 is the kernel's q
std::vector<Panel> panels(PANELS);
alignas(64) uint16_t x_pieces[GROUPS][BLOCKS][3][512];  // [16-token group][block][piece][16 pairs][16][2]
alignas(64) float scales[BLOCKS * PANEL], sums[GROUPS][BLOCKS][16], acc[32 * 32], c[4][16][16];
float sink;

void scaled(const Panel& w, int g) {  // the kernel's own loop
  qe_amx::panel_products(w[0][0], scales, scales, false, x_pieces[0][0][0], sums[0][0], BLOCKS, g, acc);
  sink += acc[5];
}

// Products (weight piece, x piece), largest first; a form takes the first N.
constexpr int W_PIECE[6] = {0, 0, 0, 1, 1, 2}, X_PIECE[6] = {0, 1, 2, 0, 1, 0};

template <int N>
void folded(const Panel& w, int g) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int b = 0; b < BLOCKS; ++b) {
    for (int p = 0; p < N; ++p) {
      if (p == 0 || W_PIECE[p] != W_PIECE[p - 1]) {
        _tile_loadd(4, w[W_PIECE[p]][b], 64);
        _tile_loadd(5, w[W_PIECE[p]][b] + 512, 64);
      }
      _tile_loadd(6, x_pieces[g][b][X_PIECE[p]], 64);
      _tile_loadd(7, x_pieces[g + 1][b][X_PIECE[p]], 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
  sink += c[1][2][3];
}

// Best of 7 timings of PASSES passes (each: one panel against all token groups), in G multiply-adds/s.
template <class Form>
double rate(Form form, bool streamed) {
  double best = 1e30;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int pass = 0; pass < PASSES; ++pass)
      for (int g = 0; g < GROUPS; g += 2) form(panels[streamed ? pass % PANELS : 0], g);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return double(PASSES) * GROUPS / 2 * BLOCKS * 32 * 32 * 32 / best / 1e9;
}

void fill(bool random) {
  uint32_t state = 1;
  const auto value = [&](bool sign) -> uint16_t {  // 1.0, or a random bfloat16 in [0.5, 2) (with a sign)
    if (!random) return 0x3f80;
    state = state * 1103515245u + 12345u;
    return static_cast<uint16_t>(((sign ? state >> 31 : 0) << 15) | (0x3f00 + (state >> 16) % 0x100));
  };
  for (auto& panel : panels)
    for (auto& piece : panel)
      for (auto& block : piece)
        for (auto& v : block) v = value(false);
  for (auto& group : x_pieces)
    for (auto& block : group)
      for (auto& piece : block)
        for (auto& v : piece) v = value(true);
  for (auto& s : scales) s = 0.5f;
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::puts("this process may not use AMX tiles");
    return 1;
  }
  qe_amx::configure_tiles();
  std::puts("G float32-equivalent multiply-adds/s, one core");
  std::puts("data    panel     scaled  folded 5  folded 6  folded 3");
  for (bool random : {false, true}) {
    fill(random);
    for (bool streamed : {false, true})
      std::printf("%-7s %-9s %6.0f  %8.0f  %8.0f  %8.0f\n", random ? "random" : "const", streamed ? "streamed" : "in L2",
                  rate(scaled, streamed), rate(folded<5>, streamed), rate(folded<6>, streamed),
                  rate(folded<3>, streamed));
  }
  _tile_release();
  return sink == 12345.0f;  // keeps the results alive
}
