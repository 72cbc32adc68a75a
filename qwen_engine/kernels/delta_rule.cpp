// One token of the gated delta rule for B sequences × H value heads (Qwen3.5's linear attention, decode steps):
//   S ← exp(g)·S;  u = β·(v − Sᵀk);  S ← S + k ⊗ u;  o = Sᵀq          (S is [Dk, Dv] per head, float32)
// in two passes over each head's S instead of PyTorch's five (decay, the prediction, the update, the read-out,
// and a copy back): the first decays S in place while it accumulates Sᵀk, the second adds k ⊗ u while it
// accumulates Sᵀq. A head's S (64 KiB at 128 × 128) stays in L2 between the two. The sums run over k in the same
// order as the PyTorch reference (models/gated_deltanet.py: recurrent_delta_rule), row by row.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <initializer_list>
#include <vector>

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
torch::Tensor delta_rule_step_(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& g, const torch::Tensor& beta, torch::Tensor state) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&q, &k, &v, &g, &beta, &state}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->is_contiguous(),
                "delta_rule_step_: every tensor must be contiguous CPU float32");
  }
  TORCH_CHECK(state.dim() == 4 && q.dim() == 3 && q.sizes() == k.sizes() && v.dim() == 3, "delta_rule_step_: shapes");
  const int64_t batch = state.size(0), heads = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(q.size(0) == batch && q.size(1) == heads && q.size(2) == dk && v.size(0) == batch &&
                  v.size(1) == heads && v.size(2) == dv && g.numel() == batch * heads && beta.numel() == batch * heads,
              "delta_rule_step_: q, k [B, H, Dk], v [B, H, Dv], g and beta [B, H] must match state [B, H, Dk, Dv]");
  torch::Tensor out = torch::empty({batch, heads, dv}, q.options());
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

void register_delta_rule(pybind11::module& m) {
  m.def("delta_rule_step_", &delta_rule_step_,
        "one token of the gated delta rule per sequence and value head, the state updated in place");
}
