// One token of the gated delta rule for B sequences × H value heads (Qwen3.5's linear attention, decode steps):
//   S ← exp(g)·S;  u = β·(v − Sᵀk);  S ← S + k ⊗ u;  o = Sᵀq          (S is [Dk, Dv] per head, float32)
// in two passes over each head's S instead of PyTorch's five (decay, the prediction, the update, the read-out,
// and a copy back): the first decays S in place while it accumulates Sᵀk, the second adds k ⊗ u while it
// accumulates Sᵀq. A head's S (64 KiB at 128 × 128) stays in L2 between the two. The sums run over k in the same
// order as the PyTorch reference (models/gated_deltanet.py: recurrent_delta_rule), row by row.

#include <cmath>
#include <initializer_list>
#include <vector>

#include "kernels.h"
#include "vec_math.h"

namespace {

void one_head(float* s, const float* q, const float* k, const float* v, float g, float beta, float* out, int64_t dk,
              int64_t dv, float* predicted) {
  const float decay = std::exp(g);
  for (int64_t j = 0; j < dv; ++j) predicted[j] = 0.0f;
  for (int64_t i = 0; i < dk; ++i) {
    float* row = s + i * dv;
    const float ki = k[i];
    for (int64_t j = 0; j < dv; ++j) {
      row[j] *= decay;
      predicted[j] += row[j] * ki;
    }
  }
  for (int64_t j = 0; j < dv; ++j) {
    predicted[j] = (v[j] - predicted[j]) * beta;  // the value written, u
    out[j] = 0.0f;
  }
  for (int64_t i = 0; i < dk; ++i) {
    float* row = s + i * dv;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      row[j] += ki * predicted[j];
      out[j] += row[j] * qi;
    }
  }
}

}  // namespace

// q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]; state [B, H, Dk, Dv], updated in place. Returns o [B, H, Dv].
at::Tensor delta_rule_step_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& g, const at::Tensor& beta, at::Tensor state) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &g, &beta, &state}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous(),
                "delta_rule_step_: every tensor must be contiguous CPU float32");
  }
  TORCH_CHECK(state.dim() == 4 && q.dim() == 3 && q.sizes() == k.sizes() && v.dim() == 3, "delta_rule_step_: shapes");
  const int64_t batch = state.size(0), heads = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(q.size(0) == batch && q.size(1) == heads && q.size(2) == dk && v.size(0) == batch &&
                  v.size(1) == heads && v.size(2) == dv && g.numel() == batch * heads && beta.numel() == batch * heads,
              "delta_rule_step_: q, k [B, H, Dk], v [B, H, Dv], g and beta [B, H] must match state [B, H, Dk, Dv]");
  at::Tensor out = at::empty({batch, heads, dv}, q.options());
  float* s = state.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> predicted(dv);
    for (int64_t h = begin; h < end; ++h) {
      one_head(s + h * dk * dv, qp + h * dk, kp + h * dk, vp + h * dv, gp[h], bp[h], op + h * dv, dk, dv,
               predicted.data());
    }
  });
  return out;
}

namespace {

inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // PyTorch's threshold

// x[0..n) *= 1 / sqrt(sum x² + 1e-6), then × scale (models/gated_deltanet.py: l2_normalise)
void l2_normalise(float* x, int64_t n, float scale) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.0f / std::sqrt(sum + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * scale;
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), "deltanet_decode_: ",
              name, " must be contiguous CPU float32");
}

}  // namespace

// Everything of a gated DeltaNet layer's decode step between its input projections and its output projection, for
// B sequences adding one token each (models/gated_deltanet.py: GatedDeltaNet.forward is the reference):
// the causal convolution over each sequence's last K − 1 inputs (shifted in place in conv_pool), SiLU, the
// l2-normalised query and key heads, the gates β = σ(b) and g = −exp(A_log)·softplus(a + dt_bias), one token of
// the delta rule on the state in delta_pool (in place), and the gated RMSNorm of each head's output.
// In PyTorch these are ~25 small operations a layer, each its own pass and allocation: 7–9 ms of a ~45 ms decode
// step of Qwen3.5-0.8B's shapes (benchmarks.md, twenty-ninth pass).
// mixed [B, C] (C = 2·Hk·Dk + Hv·Dv: q, k, v), z [B, Hv·Dv], b and a [B, Hv], slots int64 [B]; conv_pool
// [P, C, K − 1], delta_pool [P, Hv, Dk, Dv]; conv_weight [C, K]; a_log, dt_bias [Hv]; norm_weight [Dv].
// Value head h reads key head h mod Hk (tiled) or h / (Hv / Hk). Returns [B, Hv·Dv].
at::Tensor deltanet_decode_(const at::Tensor& mixed, const at::Tensor& z, const at::Tensor& b,
                            const at::Tensor& a, const at::Tensor& slots, at::Tensor conv_pool,
                            at::Tensor delta_pool, const at::Tensor& conv_weight, const at::Tensor& a_log,
                            const at::Tensor& dt_bias, const at::Tensor& norm_weight, double eps,
                            int64_t key_heads, bool tiled) {
  check_f32(mixed, "mixed"), check_f32(z, "z"), check_f32(b, "b"), check_f32(a, "a");
  check_f32(conv_pool, "the convolution state"), check_f32(delta_pool, "the delta-rule state");
  check_f32(conv_weight, "the convolution weight"), check_f32(a_log, "A_log"), check_f32(dt_bias, "dt_bias");
  check_f32(norm_weight, "the norm weight");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 1,
              "deltanet_decode_: slots must be contiguous int64 [B]");
  TORCH_CHECK(delta_pool.dim() == 4 && conv_pool.dim() == 3 && mixed.dim() == 2 && conv_weight.dim() == 2,
              "deltanet_decode_: shapes");
  const int64_t batch = mixed.size(0), channels = mixed.size(1), pool = delta_pool.size(0);
  const int64_t heads = delta_pool.size(1), dk = delta_pool.size(2), dv = delta_pool.size(3);
  const int64_t kernel = conv_weight.size(1), kept = kernel - 1;
  TORCH_CHECK(key_heads > 0 && heads % key_heads == 0 && channels == 2 * key_heads * dk + heads * dv &&
                  conv_pool.size(0) == pool && conv_pool.size(1) == channels && conv_pool.size(2) == kept &&
                  conv_weight.size(0) == channels && slots.numel() == batch && z.numel() == batch * heads * dv &&
                  b.numel() == batch * heads && a.numel() == batch * heads && a_log.numel() == heads &&
                  dt_bias.numel() == heads && norm_weight.numel() == dv,
              "deltanet_decode_: the tensors' shapes do not fit one layer");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < pool, "deltanet_decode_: slot ", slot[i], " outside the pool");

  std::vector<float> features(batch * channels);
  float* conv = conv_pool.data_ptr<float>();
  const float* w = conv_weight.data_ptr<float>();
  const float* x = mixed.data_ptr<float>();
  const float q_scale = 1.0f / std::sqrt(static_cast<float>(dk));
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      float* f = features.data() + i * channels;
      for (int64_t c = 0; c < channels; ++c) {
        float* window = conv + (slot[i] * channels + c) * kept;
        const float* wc = w + c * kernel;
        const float input = x[i * channels + c];
        float sum = 0.0f;
        for (int64_t t = 0; t < kept; ++t) sum += window[t] * wc[t];
        sum += input * wc[kept];
        for (int64_t t = 0; t + 1 < kept; ++t) window[t] = window[t + 1];
        if (kept > 0) window[kept - 1] = input;
        f[c] = sum;
      }
      silu_mul_to(f, nullptr, f, channels);  // (vectorised: std::exp took ~1 ms of a one-stream step)
      for (int64_t h = 0; h < key_heads; ++h) {
        l2_normalise(f + h * dk, dk, q_scale);
        l2_normalise(f + (key_heads + h) * dk, dk, 1.0f);
      }
    }
  });

  at::Tensor out = at::empty({batch, heads * dv}, mixed.options());
  float* state = delta_pool.data_ptr<float>();
  const float *zp = z.data_ptr<float>(), *bp = b.data_ptr<float>(), *ap = a.data_ptr<float>();
  const float *alog = a_log.data_ptr<float>(), *bias = dt_bias.data_ptr<float>(), *nw = norm_weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t repeat = heads / key_heads;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> predicted(dv), gate(dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t i = bh / heads, h = bh % heads, kh = tiled ? h % key_heads : h / repeat;
      const float* f = features.data() + i * channels;
      const float beta = 1.0f / (1.0f + std::exp(-bp[bh]));
      const float g = -std::exp(alog[h]) * softplus(ap[bh] + bias[h]);
      float* o = op + bh * dv;
      one_head(state + (slot[i] * heads + h) * dk * dv, f + kh * dk, f + (key_heads + kh) * dk,
               f + 2 * key_heads * dk + h * dv, g, beta, o, dk, dv, predicted.data());
      float squares = 0.0f;
      for (int64_t j = 0; j < dv; ++j) squares += o[j] * o[j];
      const float r = 1.0f / std::sqrt(squares / static_cast<float>(dv) + static_cast<float>(eps));
      silu_mul_to(zp + bh * dv, nullptr, gate.data(), dv);
      for (int64_t j = 0; j < dv; ++j) o[j] = nw[j] * (o[j] * r) * gate[j];
    }
  });
  return out;
}

// A prompt chunk's causal depthwise convolution and SiLU (models/gated_deltanet.py: the prefill branch of
// GatedDeltaNet.forward): x [T, C] token-major, state [C, K − 1] the sequence's last inputs before x (replaced by
// its last inputs after x), weight [C, K]. Returns silu(conv) [T, C], token-major as the heads read it. Each
// output sums its K products in the decode kernel's order (deltanet_decode_ above). PyTorch's form — cat, a
// grouped conv1d, SiLU and two transposes — took 12.7 ms for 512 tokens × 6144 channels here, this 3.2 ms
// (benchmarks.md, thirty-seventh pass).
at::Tensor causal_conv_silu_(const at::Tensor& x, at::Tensor state, const at::Tensor& weight) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &state, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous() && t->dim() == 2,
                "causal_conv_silu_: x [T, C], state [C, K - 1] and weight [C, K] must be contiguous CPU float32");
  const int64_t T = x.size(0), C = x.size(1), K = weight.size(1), kept = K - 1;
  TORCH_CHECK(weight.size(0) == C && state.size(0) == C && state.size(1) == kept && K >= 1,
              "causal_conv_silu_: the channels or the kernel width do not match");
  // The weights tap by tap ([K, C]) and the state as K − 1 token rows, so every loop below runs along channels.
  std::vector<float> taps(K * C), before(kept * C);
  const float *w = weight.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < K; ++j) taps[j * C + c] = w[c * K + j];
    for (int64_t j = 0; j < kept; ++j) before[j * C + c] = sp[c * kept + j];
  }
  // input i of the extended sequence [state, x], i in 0 .. kept + T
  auto row = [&](int64_t i) { return i < kept ? before.data() + i * C : xp + (i - kept) * C; };
  at::Tensor out = at::empty({T, C}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> sum(C);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t j = 0; j < K; ++j) {
        const float *in = row(t + j), *tap = taps.data() + j * C;
        for (int64_t c = 0; c < C; ++c) sum[c] += in[c] * tap[c];
      }
      silu_mul_to(sum.data(), nullptr, op + t * C, C);
    }
  });
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < kept; ++j) sp[c * kept + j] = row(T + j)[c];
  return out;
}

// X = (I + L)⁻¹ B for each of H heads, L [H, C, C] strictly lower (its diagonal and upper triangle are not read),
// B [H, C, D]: forward substitution, x_i = b_i − Σ_{j<i} L_ij · x_j, a row of D values at a time. The chunked
// delta rule's triangular system (models/gated_deltanet.py: chunked_delta_rule); PyTorch's solve_triangular on
// I + L, a batched LAPACK call, took 0.5-0.7 ms a chunk of 64 tokens × 16 heads × 128 values here (this 0.14),
// ~5 % of an a8 prefill of Qwen3.5-0.8B's shapes (benchmarks.md, thirty-seventh pass).
at::Tensor unit_lower_solve(const at::Tensor& lower, const at::Tensor& b) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&lower, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous() && t->dim() == 3,
                "unit_lower_solve: L [H, C, C] and B [H, C, D] must be contiguous CPU float32");
  const int64_t H = b.size(0), C = b.size(1), D = b.size(2);
  TORCH_CHECK(lower.size(0) == H && lower.size(1) == C && lower.size(2) == C,
              "unit_lower_solve: L must be [H, C, C] for B [H, C, D]");
  at::Tensor x = b.clone();
  float* xp = x.data_ptr<float>();
  const float* lp = lower.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      float* X = xp + h * C * D;
      const float* L = lp + h * C * C;
      for (int64_t i = 1; i < C; ++i) {
        float* xi = X + i * D;
        for (int64_t j = 0; j < i; ++j) {
          const float l = L[i * C + j];
          const float* xj = X + j * D;
          for (int64_t d = 0; d < D; ++d) xi[d] -= l * xj[d];
        }
      }
    }
  });
  return x;
}
