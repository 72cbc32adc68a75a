// Elementwise steps of bfloat16 models in one pass each (the rotation of bfloat16 q/k is rotary_, in
// paged_attention.cpp). The reference (transformers, and our PyTorch path)
// computes them in float32 on a converted copy and converts back. These kernels convert on the fly and round to
// bf16 exactly where the reference rounds, so the results are the reference's. (The RMS norm's sum of squares is
// taken in double, as in decode_step.cpp, which can move a rare value by one last bit.)
//
//   rms_norm_bf16: y = w * bf16(x / sqrt(mean(x^2) + eps))     (the product rounded to bf16: w * x.to(bf16))
//   silu_mul_bf16: y = bf16(bf16(g / (1 + e^-g)) * u)              (F.silu(gate) * up, each rounded to bf16)
//
// Built where the compiler targets AVX512-BF16 (its rounding instruction); elsewhere `bf16_kernels()` is false
// and the callers keep the PyTorch path.

#include <cmath>

#include "kernels.h"
#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QE_BF16 1
#else
#define QE_BF16 0
#endif

#if QE_BF16
namespace {

inline __m512 load16(const c10::BFloat16* p) {  // 16 bf16 → float32 (exact: a shift)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m256i to_bf16(__m512 v) {  // round to nearest even, as PyTorch's conversion
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

inline __m512 widen(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
}

inline float f(c10::BFloat16 v) { return static_cast<float>(v); }
inline float rounded(float v) { return static_cast<float>(c10::BFloat16(v)); }

}  // namespace
#endif

bool bf16_kernels() { return QE_BF16; }

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(QE_BF16, "this build has no bfloat16 kernels");
  TORCH_CHECK(x.dtype() == at::kBFloat16 && weight.dtype() == at::kBFloat16 && x.device().is_cpu() &&
                  x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm_bf16: x bfloat16 [..., n] and weight bfloat16 [n] on the CPU");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  auto y = at::empty_like(xc);
#if QE_BF16
  const int64_t dim = xc.size(-1), rows = dim ? xc.numel() / dim : 0;
  const c10::BFloat16 *xp = xc.data_ptr<c10::BFloat16>(), *wp = wc.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* a = xp + r * dim;
      c10::BFloat16* o = yp + r * dim;
      __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
      int64_t i = 0;
      for (; i + 16 <= dim; i += 16) {
        const __m512 v = load16(a + i);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        s0 = _mm512_fmadd_pd(lo, lo, s0);
        s1 = _mm512_fmadd_pd(hi, hi, s1);
      }
      double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
      for (; i < dim; ++i) ss += static_cast<double>(f(a[i])) * f(a[i]);
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / dim) + feps);
      const __m512 vinv = _mm512_set1_ps(inv);
      for (i = 0; i + 16 <= dim; i += 16) {
        const __m512 z = widen(to_bf16(_mm512_mul_ps(load16(a + i), vinv)));  // x.to(bf16) after normalising
        store16(o + i, _mm512_mul_ps(load16(wp + i), z));
      }
      for (; i < dim; ++i) o[i] = c10::BFloat16(f(wp[i]) * rounded(f(a[i]) * inv));
    }
  });
#endif
  return y;
}

at::Tensor silu_mul_bf16(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(QE_BF16, "this build has no bfloat16 kernels");
  TORCH_CHECK(gate.dtype() == at::kBFloat16 && up.dtype() == at::kBFloat16 && gate.sizes() == up.sizes() &&
                  gate.device().is_cpu() && up.device().is_cpu(),
              "silu_mul_bf16: gate and up bfloat16 of one shape on the CPU");
  const auto gc = gate.contiguous(), uc = up.contiguous();
  auto y = at::empty_like(gc);
#if QE_BF16
  const c10::BFloat16 *gp = gc.data_ptr<c10::BFloat16>(), *up_ = uc.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t n = gc.numel();
  at::parallel_for(0, (n + 15) / 16, 256, [&](int64_t b0, int64_t b1) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = b0 * 16;
    const int64_t end = std::min(n, b1 * 16);
    for (; i + 16 <= end; i += 16) {
      const __m512 g = load16(gp + i);
      const __m512 s = widen(to_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))))));
      store16(yp + i, _mm512_mul_ps(s, load16(up_ + i)));
    }
    for (; i < end; ++i) {
      const float g = f(gp[i]);
      yp[i] = c10::BFloat16(rounded(g / (1.0f + std::exp(-g))) * f(up_[i]));
    }
  });
#endif
  return y;
}
