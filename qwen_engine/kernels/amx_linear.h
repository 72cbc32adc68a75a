// The prefill product on AMX bfloat16 tiles (amx_linear.cpp), called by quant_matmul.cpp's linear().
#pragma once
#include <cstdint>
#include <vector>

namespace qe_amx {

// One stacked weight segment: `rows` rows of GGUF blocks of type `qtype`, output rows first..first + rows.
struct Part {
  const uint8_t* data;
  int64_t qtype, rows, row_bytes, first;
};

// The 64-byte operand of _tile_loadconfig (palette 1): bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this build has the AMX kernels and Linux hands this process the tile registers (asked once).
bool tiles_granted();
// Whether `linear` below reads weights of these block types together.
bool supports(const std::vector<int64_t>& qtypes);
// y [M, N] = x [M, K] @ W^T (+ bias), W made of `parts`; as exact as a float32 product (see amx_linear.cpp).
void linear(const float* x, int64_t M, int64_t K, const std::vector<Part>& parts, int64_t N, const float* bias,
            float* y);

}  // namespace qe_amx
