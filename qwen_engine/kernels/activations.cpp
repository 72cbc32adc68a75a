// The vision towers' MLP activations in one pass, in place over the first layer's output (a second tensor as
// large, 70-90 MB at 1024x1024, costs its page faults each block):
//   silu_mul_(gate, up):  gate = silu(gate) * up                      (float32; Qwen2.5-VL)
//   gelu_tanh_(x):        x = x * sigmoid(2u), u = √(2/π)(x + 0.044715 x³)   (float32 or bf16; Qwen3-VL)
// x·σ(2u) is 0.5·x·(1 + tanh u) (PyTorch's gelu(approximate="tanh")) rewritten without the cancellation of
// 1 + tanh u: both agree to float32 rounding, except below x ≈ -5, where PyTorch's form returns 0 and this one the
// true value (|y| < 1e-5). A bf16 x is widened, and its result rounded once, as PyTorch's bf16 gelu does.

#include <cmath>

#include "kernels.h"
#include "vec_math.h"

namespace {

constexpr float SQRT_2_OVER_PI = 0.7978845608028654f, CUBIC = 0.044715f;

inline float gelu_tanh_scalar(float x) {
  const float u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
  return x / (1.0f + std::exp(-2.0f * u));
}

#if defined(__AVX512F__)
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(-2.0f * SQRT_2_OVER_PI),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(CUBIC), x), _mm512_mul_ps(x, x), x));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(u));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));  // r (2 - d r): one Newton step
  return _mm512_mul_ps(x, r);
}
#endif

void gelu_tanh_f32(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gelu_tanh16(_mm512_loadu_ps(x + i)));
#elif QE_VEC8
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(-2.0f * SQRT_2_OVER_PI),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(CUBIC), v), _mm256_mul_ps(v, v), v));
    _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(u))));
  }
#endif
  for (; i < n; ++i) x[i] = gelu_tanh_scalar(x[i]);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define QE_ACT_BF16 1
void gelu_tanh_bf16(c10::BFloat16* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i* p = reinterpret_cast<__m256i*>(x + i);
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
    _mm256_storeu_si256(p, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(gelu_tanh16(v))));
  }
  for (; i < n; ++i) x[i] = c10::BFloat16(gelu_tanh_scalar(static_cast<float>(x[i])));
}
#else
#define QE_ACT_BF16 0
#endif

// f(start, count) over the n values of x in chunks of a few pages, split between the threads.
template <class F>
void in_chunks(int64_t n, F f) {
  constexpr int64_t CHUNK = 16384;
  at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * CHUNK, std::min(CHUNK, n - c * CHUNK));
  });
}

}  // namespace

bool gelu_tanh_supports(const at::Tensor& x) {
  return x.device().is_cpu() && x.is_contiguous() &&
         (x.scalar_type() == at::kFloat || (QE_ACT_BF16 && x.scalar_type() == at::kBFloat16));
}

at::Tensor gelu_tanh_(at::Tensor x) {
  TORCH_CHECK(gelu_tanh_supports(x), "gelu_tanh_: x must be a contiguous CPU float32 (or, with AVX512-BF16, "
              "bfloat16) tensor");
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    float* p = x.data_ptr<float>();
    in_chunks(n, [&](int64_t start, int64_t count) { gelu_tanh_f32(p + start, count); });
  }
#if QE_ACT_BF16
  else {
    c10::BFloat16* p = x.data_ptr<c10::BFloat16>();
    in_chunks(n, [&](int64_t start, int64_t count) { gelu_tanh_bf16(p + start, count); });
  }
#endif
  return x;
}

at::Tensor silu_mul_(at::Tensor gate, const at::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.device().is_cpu() &&
                  up.device().is_cpu() && gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(),
              "silu_mul_: gate and up must be contiguous CPU float32 tensors of one shape");
  float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  in_chunks(gate.numel(), [&](int64_t start, int64_t count) { silu_mul_to(g + start, u + start, g + start, count); });
  return gate;
}
