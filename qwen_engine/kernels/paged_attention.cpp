// Decode attention straight from the paged KV cache: one new query token per sequence, its keys and values
// read in place through the sequence's slot list (no gathered copy of the context per layer).
//
// For sequence b and query head h (kv head h / group): out = softmax(scale · q·K^T) · V over the sequence's
// first lengths[b] slots. The same arithmetic as the PyTorch path (kv_cache.decode_attention) up to the
// order of the sums.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 a = _mm512_set1_ps(alpha);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// Stores this step's keys/values (k_new, v_new [n, Hkv, D]) at write_slots [n] of the pool (k, v [slots, Hkv, D]).
void write_kv(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_new, const torch::Tensor& v_new,
              const torch::Tensor& write_slots) {
  TORCH_CHECK(k_new.dtype() == torch::kFloat32 && v_new.dtype() == torch::kFloat32 && k_new.dim() == 3 &&
                  k_new.size(1) == k.size(1) && k_new.size(2) == k.size(2) && v_new.sizes() == k_new.sizes(),
              "new keys/values must be float32 [n, Hkv, D] like the pool's rows");
  TORCH_CHECK(write_slots.dtype() == torch::kInt64 && write_slots.numel() == k_new.size(0), "one slot per new row");
  const auto kn = k_new.contiguous(), vn = v_new.contiguous(), ws = write_slots.contiguous();
  const int64_t row = k.size(1) * k.size(2), n = kn.size(0);
  const int64_t* slot = ws.data_ptr<int64_t>();
  float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < k.size(0), "slot ", slot[i], " out of range");
    std::copy(kn.data_ptr<float>() + i * row, kn.data_ptr<float>() + (i + 1) * row, kp + slot[i] * row);
    std::copy(vn.data_ptr<float>() + i * row, vn.data_ptr<float>() + (i + 1) * row, vp + slot[i] * row);
  }
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& slots, const torch::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "q, k and v must be float32");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q [B, Hq, D]; k, v [slots, Hkv, D]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "the cache layers must be contiguous");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && slots.dim() == 2 && lengths.dtype() == torch::kInt64,
              "slots int64 [B, S], lengths int64 [B]");
  const auto qc = q.contiguous(), sc = slots.contiguous(), lc = lengths.contiguous();
  const int64_t B = qc.size(0), Hq = qc.size(1), D = qc.size(2), Hkv = k.size(1), S = sc.size(1);
  const int64_t num_slots = k.size(0);
  TORCH_CHECK(k.size(2) == D && Hq % Hkv == 0, "head sizes do not match");
  TORCH_CHECK(sc.size(0) == B && lc.numel() == B, "one slot row and one length per sequence");
  const int64_t group = Hq / Hkv;
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= S, "sequence length ", lp[b], " outside 1..", S);
    for (int64_t s = 0; s < lp[b]; ++s)
      TORCH_CHECK(sp[b * S + s] >= 0 && sp[b * S + s] < num_slots, "slot ", sp[b * S + s], " out of range");
  }
  auto out = torch::empty({B, Hq * D}, qc.options());
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  // One task per (sequence, kv head): its group of query heads shares every key and value row it reads.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv, n = lp[b];
      const int64_t* seq_slots = sp + b * S;
      scores.assign(group * n, 0.0f);
      for (int64_t s = 0; s < n; ++s) {
        const float* key = kp + (seq_slots[s] * Hkv + h) * D;
        for (int64_t j = 0; j < group; ++j) scores[j * n + s] = dot(qp + (b * Hq + h * group + j) * D, key, D) * fscale;
      }
      for (int64_t j = 0; j < group; ++j) {
        float* row = scores.data() + j * n;
        const float top = *std::max_element(row, row + n);
        const float sum = exp_shifted(row, top, row, n);
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < n; ++s) row[s] *= inv;
        float* o = op + b * Hq * D + (h * group + j) * D;
        std::fill(o, o + D, 0.0f);
      }
      for (int64_t s = 0; s < n; ++s) {
        const float* value = vp + (seq_slots[s] * Hkv + h) * D;
        for (int64_t j = 0; j < group; ++j) axpy(scores[j * n + s], value, op + b * Hq * D + (h * group + j) * D, D);
      }
    }
  });
  return out;
}

// In place, for x [T, H, D] (rows may be strided, e.g. q and k inside the fused qkv output) and cos/sin [T, D]:
// x = x * cos + rotate_half(x) * sin, pairs (i, i + D/2) as in Qwen. The same operations as the PyTorch
// version (layers.apply_rotary), in the same order, so the results are bit-identical.
void rotary_(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3 && x.stride(2) == 1, "x must be float32 [T, H, D]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.sizes() == sin.sizes() && cos.size(0) == T && cos.size(1) == D,
              "cos/sin must be [T, D] for an even D");
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  TORCH_CHECK(cc.dtype() == torch::kFloat32 && sc.dtype() == torch::kFloat32, "cos/sin must be float32");
  float* xp = x.data_ptr<float>();
  const float *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  const int64_t st = x.stride(0), sh = x.stride(1);
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = cp + t * D, *s = sp + t * D;
      for (int64_t h = 0; h < H; ++h) {
        float* r = xp + t * st + h * sh;
        for (int64_t i = 0; i < half; ++i) {
          const float a = r[i], b = r[i + half];
          r[i] = a * c[i] + (-b) * s[i];
          r[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}
