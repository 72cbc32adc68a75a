// One decode step of every decoder layer in a single native call.
//
// When each sequence of a step adds one token, a layer is a handful of matrix-vector products and a dozen small
// vector operations. Run from Python, those small operations cost ~20 µs each in dispatch alone (about a quarter
// of a step for the 0.5B model); here they are plain loops over a few thousand floats, and the products call
// the quantised kernels directly. The arithmetic is the PyTorch path's (models/qwen.py) up to the order of sums
// and the exp of SiLU, so logits agree to ~1e-5 and greedy tokens are the same.
//
// Layer, per row of x [B, hidden]:
//   h = x + o(attention(rotate(q), rotate(k), v))   with q, k, v = qkv(rms_norm(x))  (Qwen3: per-head norms first)
//   x = h + down(silu(gate) * up)                   with gate, up = gate_up(rms_norm(h))
// or, in the sparse layers of a mixture of experts, x = h + Σ over the chosen experts of weight · expert(rms_norm(h)).
// A hybrid model (Qwen3.5, Qwen3-Next) mixes tokens in three layers of four with a gated DeltaNet instead of
// attention (h = x + out_proj(deltanet(in_proj(rms_norm(x))))), and gates its attention layers' output by
// σ(gate), the gate coming from q_proj beside each head's q, with only part of each head rotated.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <memory>
#include <vector>

#include "decode_step.h"
#include "kernels.h"
#include "vec_math.h"

namespace {

// y = x / sqrt(mean(x²) + eps) * w for each of `rows` rows of `dim` values (x and y may be the same).
void rms_norm(const float* x, int64_t rows, int64_t dim, int64_t stride, const float* w, float eps, float* y,
              int64_t ystride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = x + r * stride;
    float* o = y + r * ystride;
    double ss = 0.0;  // double: the sum of squares of a few thousand values, as exact as PyTorch's reduction
    int64_t i = 0;
#if defined(__AVX512F__)
    // Eight double lanes in two accumulators: a scalar double sum waits ~4 cycles per value.
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (; i + 16 <= dim; i += 16) {
      const __m512d lo = _mm512_cvtps_pd(_mm256_loadu_ps(a + i)), hi = _mm512_cvtps_pd(_mm256_loadu_ps(a + i + 8));
      s0 = _mm512_fmadd_pd(lo, lo, s0);
      s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
    ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
#endif
    for (; i < dim; ++i) ss += static_cast<double>(a[i]) * a[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
    for (int64_t i = 0; i < dim; ++i) o[i] = a[i] * inv * w[i];
  }
}

// rms_norm of the residual stream's rows, shared between the threads from 8 rows (one thread normed a 32-stream
// step's 49 times 32 rows while the other waited: ~1 % of the step, perf).
void rms_norm_parallel(const float* x, int64_t rows, int64_t dim, const float* w, float eps, float* y) {
  if (rows < 8) return rms_norm(x, rows, dim, dim, w, eps, y, dim);
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    rms_norm(x + r0 * dim, r1 - r0, dim, dim, w, eps, y + r0 * dim, dim);
  });
}

// x[i] += y[i] for the n values of a contiguous float32 tensor y (the residual adds: a plain loop here costs
// well under the few microseconds of a dispatched add_).
void add_into(float* x, const at::Tensor& y, int64_t n) {
  TORCH_CHECK(y.is_contiguous() && y.numel() == n, "residual branch must be contiguous with ", n, " values");
  const float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) x[i] += yp[i];
}

// silu(gate) · up in place over the first half of each row of gate_up [rows, 2n]; returns that half.
at::Tensor silu_mul_in_place(at::Tensor gate_up, int64_t n) {
  float* gu = gate_up.data_ptr<float>();
  const int64_t rows = gate_up.size(0);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul(gu + r * 2 * n, gu + r * 2 * n + n, n);
  });
  return gate_up.narrow(1, 0, n);
}

}  // namespace

DecodeStep::DecodeStep(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                       double eps, at::Tensor final_norm, int64_t gemv_max_rows)
    : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate),
      eps_(static_cast<float>(eps)), final_norm_(check_vector(final_norm, hidden, "final norm")),
      gemv_max_rows_(gemv_max_rows) {}

at::Tensor DecodeStep::Linear::operator()(const at::Tensor& x, int64_t gemv_max_rows) const {
  if (!parts.empty()) {
    std::vector<at::Tensor> ys;
    int64_t N = 0;
    for (const auto& part : parts) N += ys.emplace_back(part(x, gemv_max_rows)).size(1);
    const int64_t M = x.size(0);
    auto y = at::empty({M, N}, x.options());
    float* yp = y.data_ptr<float>();
    int64_t n0 = 0;
    for (const auto& part : ys) {  // (its rows of outputs into their columns)
      const int64_t n = part.size(1);
      const float* pp = part.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) std::copy_n(pp + m * n, n, yp + m * N + n0);
      n0 += n;
    }
    return y;
  }
#if QE_INT8
  if (group > 0)
    return int8_amx ? int8_linear_amx(x, int8_weight, packed_rows, int8_scales, bias, group, int8_factors)
                    : int8_linear_units(x, int8_weight, packed_rows, int8_scales, bias, group, int8_factors,
                                        int8_offsets, int8_planes, int8_zero);
#endif
  TORCH_CHECK(group == 0, "this build has no int8 kernels");
  return linear(x, blocks, qtypes, bias, gemv_max_rows);
}

void DecodeStep::add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                           c10::optional<at::Tensor> k_norm, std::vector<at::Tensor> qkv,
                           std::vector<int64_t> qkv_types, c10::optional<at::Tensor> qkv_bias,
                           std::vector<at::Tensor> o, std::vector<int64_t> o_types, std::vector<at::Tensor> gate_up,
                           std::vector<int64_t> gate_up_types, std::vector<at::Tensor> down,
                           std::vector<int64_t> down_types) {
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms come together");
  Layer l{check_vector(input_norm, hidden_, "input norm"), check_vector(post_norm, hidden_, "post-attention norm"),
          c10::nullopt, c10::nullopt,
          {std::move(qkv), std::move(qkv_types), qkv_bias}, {std::move(o), std::move(o_types), c10::nullopt},
          {std::move(gate_up), std::move(gate_up_types), c10::nullopt},
          {std::move(down), std::move(down_types), c10::nullopt}};
  if (q_norm.has_value()) {
    l.q_norm = check_vector(*q_norm, head_dim_, "q norm");
    l.k_norm = check_vector(*k_norm, head_dim_, "k norm");
  }
  l.kv_index = num_layers();
  layers_.push_back(std::move(l));
}

void DecodeStep::add_linear_layer(at::Tensor input_norm, at::Tensor post_norm,
                                  std::vector<std::vector<at::Tensor>> projections,
                                  std::vector<std::vector<int64_t>> projection_types, at::Tensor conv_weight,
                                  at::Tensor a_log, at::Tensor dt_bias, at::Tensor norm_weight, int64_t key_heads,
                                  bool tiled, int64_t state_index, std::vector<at::Tensor> gate_up,
                                  std::vector<int64_t> gate_up_types, std::vector<at::Tensor> down,
                                  std::vector<int64_t> down_types) {
  TORCH_CHECK(projections.size() == 5 && projection_types.size() == 5,
              "a DeltaNet layer has five projections: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj");
  TORCH_CHECK(key_heads > 0 && state_index >= 0, "a DeltaNet layer needs key heads and a row in the state pools");
  auto d = std::make_shared<DeltaNet>();
  Linear* targets[5] = {&d->in_qkv, &d->in_z, &d->in_b, &d->in_a, &d->out_proj};
  for (size_t i = 0; i < 5; ++i)
    *targets[i] = Linear{std::move(projections[i]), std::move(projection_types[i]), c10::nullopt};
  // (deltanet_decode_ checks these against each other and the pools at every step)
  d->conv_weight = conv_weight.contiguous();
  d->a_log = a_log.contiguous();
  d->dt_bias = dt_bias.contiguous();
  d->norm_weight = norm_weight.contiguous();
  d->key_heads = key_heads;
  d->tiled = tiled;
  d->state_index = state_index;
  Layer l{check_vector(input_norm, hidden_, "input norm"), check_vector(post_norm, hidden_, "post-attention norm"),
          c10::nullopt, c10::nullopt, {}, {},
          {std::move(gate_up), std::move(gate_up_types), c10::nullopt},
          {std::move(down), std::move(down_types), c10::nullopt}};
  l.deltanet = std::move(d);
  layers_.push_back(std::move(l));
}

void DecodeStep::set_attention(int64_t li, int64_t kv_index, int64_t rotary_dim, bool output_gate) {
  TORCH_CHECK(li >= 0 && li < num_layers() && !layers_[li].deltanet, "no attention layer ", li);
  TORCH_CHECK(kv_index >= 0, "a KV pool row is not negative");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_dim_ && rotary_dim % 2 == 0,
              "the rotated values of a head must be an even count up to its ", head_dim_);
  layers_[li].kv_index = kv_index;
  layers_[li].rotary_dim = rotary_dim;
  layers_[li].output_gate = output_gate;
}

void DecodeStep::set_int8(int64_t li, const std::string& which, at::Tensor weight, at::Tensor scales,
                          c10::optional<at::Tensor> bias, int64_t group, int64_t packed_rows,
                          c10::optional<at::Tensor> factors, c10::optional<at::Tensor> offsets, bool amx,
                          int64_t planes, int64_t zero, bool append) {
  TORCH_CHECK(li >= 0 && li < num_layers(), "no layer ", li);
  Layer& l = layers_[li];
  DeltaNet* d = l.deltanet.get();
  Linear* p = which == "gate_up" ? &l.gate_up : which == "down" ? &l.down
            : d == nullptr ? (which == "qkv" ? &l.qkv : which == "o" ? &l.o : nullptr)
            : which == "in_qkv" ? &d->in_qkv : which == "in_z" ? &d->in_z : which == "in_b" ? &d->in_b
            : which == "in_a" ? &d->in_a : which == "out_proj" ? &d->out_proj : nullptr;
  if (p == nullptr && l.moe) p = expert_projection(*l.moe, which);
  TORCH_CHECK(p != nullptr, "no projection ", which);
  TORCH_CHECK(group > 0 && packed_rows > 0, "int8 weights must be packed (AMX tiles or units of rows)");
  TORCH_CHECK(!amx || int8_has_amx(), "AMX tiles are not available to this process");
  Linear made{{}, {}, bias, weight, scales, group, packed_rows, factors, offsets, amx, planes, zero};
  if (!append) {
    *p = std::move(made);
    return;
  }
  TORCH_CHECK(p->group > 0 || !p->parts.empty(), "projection ", which, " has no int8 part to follow");
  if (p->parts.empty()) {  // the product so far becomes the first part
    Linear first = std::move(*p);
    *p = Linear{{}, {}, c10::nullopt};
    p->parts.push_back(std::move(first));
  }
  p->parts.push_back(std::move(made));
}

// A mixture's "experts.<e>.gate_up" / "experts.<e>.down" / "shared_expert.gate_up" / "shared_expert.down"; null for
// any other.
DecodeStep::Linear* DecodeStep::expert_projection(Moe& m, const std::string& which) {
  const auto dot = which.rfind('.');
  if (dot == std::string::npos) return nullptr;
  const std::string owner = which.substr(0, dot), kind = which.substr(dot + 1);
  if (kind != "gate_up" && kind != "down") return nullptr;
  if (owner == "shared_expert") return !m.shared ? nullptr : kind == "gate_up" ? &m.shared_gate_up : &m.shared_down;
  if (owner.rfind("experts.", 0) != 0) return nullptr;
  const std::string number = owner.substr(8);
  if (number.empty() || number.find_first_not_of("0123456789") != std::string::npos) return nullptr;
  const size_t e = std::stoul(number);
  if (e >= m.gate_up.size()) return nullptr;
  return kind == "gate_up" ? &m.gate_up[e] : &m.down[e];
}

void DecodeStep::set_moe(int64_t li, std::vector<at::Tensor> router, std::vector<int64_t> router_types,
                         int64_t top_k, bool norm_topk, int64_t width, std::vector<std::vector<at::Tensor>> gate_up,
                         std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
                         std::vector<std::vector<int64_t>> down_types, std::vector<at::Tensor> shared_gate_up,
                         std::vector<int64_t> shared_gate_up_types, std::vector<at::Tensor> shared_down,
                         std::vector<int64_t> shared_down_types, std::vector<at::Tensor> shared_gate,
                         std::vector<int64_t> shared_gate_types, int64_t shared_width) {
  TORCH_CHECK(li >= 0 && li < num_layers(), "no layer ", li);
  const size_t experts = gate_up.size();
  TORCH_CHECK(experts > 0 && down.size() == experts && gate_up_types.size() == experts &&
                  down_types.size() == experts && top_k > 0 && top_k <= static_cast<int64_t>(experts),
              "a mixture needs 1 <= top_k <= experts, and a gate_up and a down weight per expert");
  auto moe = std::make_shared<Moe>();
  moe->router = Linear{std::move(router), std::move(router_types), c10::nullopt};
  for (size_t e = 0; e < experts; ++e) {
    moe->gate_up.push_back(Linear{std::move(gate_up[e]), std::move(gate_up_types[e]), c10::nullopt});
    moe->down.push_back(Linear{std::move(down[e]), std::move(down_types[e]), c10::nullopt});
  }
  moe->top_k = top_k;
  moe->width = width;
  moe->norm_topk = norm_topk;
  moe->shared = shared_width > 0;  // (its products' segments are empty where they are int8: set_int8 then)
  if (moe->shared) {
    moe->shared_gate_up = Linear{std::move(shared_gate_up), std::move(shared_gate_up_types), c10::nullopt};
    moe->shared_down = Linear{std::move(shared_down), std::move(shared_down_types), c10::nullopt};
    moe->shared_gate = Linear{std::move(shared_gate), std::move(shared_gate_types), c10::nullopt};
    moe->shared_width = shared_width;
  }
  layers_[li].moe = std::move(moe);
}

at::Tensor DecodeStep::forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pool,
                               const at::Tensor& v_pool, const at::Tensor& write_slots, const at::Tensor& slots,
                               const at::Tensor& lengths, const c10::optional<at::Tensor>& conv_pool,
                               const c10::optional<at::Tensor>& delta_pool,
                               const c10::optional<at::Tensor>& state_slots) const {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == hidden_ && x.device().is_cpu(),
              "x must be CPU float32 [B, hidden]");
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.size(2) == kv_heads_ && k_pool.size(3) == head_dim_ &&
                  v_pool.sizes() == k_pool.sizes(),
              "KV pools must be [attention layers, slots, kv_heads, head_dim]");
  for (const Layer& l : layers_) {
    TORCH_CHECK(l.deltanet || l.kv_index < k_pool.size(0), "the KV pools have no row ", l.kv_index);
    TORCH_CHECK(!l.deltanet || (conv_pool.has_value() && delta_pool.has_value() && state_slots.has_value() &&
                                conv_pool->dim() == 4 && delta_pool->dim() == 5 &&
                                l.deltanet->state_index < conv_pool->size(0) &&
                                l.deltanet->state_index < delta_pool->size(0)),
                "a hybrid model's decode step needs its recurrent state pools and each sequence's slot in them");
  }
  const int64_t B = x.size(0);
  Clock clock{profiling_ ? &seconds_ : nullptr, std::chrono::steady_clock::now()};
  x = x.contiguous().clone();  // the residual stream, updated in place
  auto normed = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  for (int64_t li = 0; li < num_layers(); ++li) {
    const Layer& l = layers_[li];
    rms_norm_parallel(xp, B, hidden_, l.input_norm.data_ptr<float>(), eps_, normed.data_ptr<float>());
    clock.lap(NORMS);
    if (l.deltanet)
      linear_attention(*l.deltanet, normed, xp, *conv_pool, *delta_pool, *state_slots, clock);
    else
      attention(l, li, normed, xp, cos, sin, k_pool, v_pool, write_slots, slots, lengths, clock);
    rms_norm_parallel(xp, B, hidden_, l.post_norm.data_ptr<float>(), eps_, normed.data_ptr<float>());
    clock.lap(NORMS);
    if (l.moe) {
      mixture(*l.moe, normed, xp, clock);
      continue;
    }
    auto gate_up = l.gate_up(normed, gemv_max_rows_);  // [B, 2 intermediate]
    clock.lap(GATE_UP);
    TORCH_CHECK(gate_up.size(1) == 2 * intermediate_, "gate/up projection has ", gate_up.size(1), " outputs");
    float* gu = gate_up.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        silu_mul(gu + b * 2 * intermediate_, gu + b * 2 * intermediate_ + intermediate_, intermediate_);
    });
    clock.lap(SILU);
    const auto down = l.down(gate_up.narrow(1, 0, intermediate_), gemv_max_rows_);
    clock.lap(DOWN);
    add_into(xp, down, B * hidden_);
  }
  auto out = at::empty_like(x);
  rms_norm_parallel(xp, B, hidden_, final_norm_.data_ptr<float>(), eps_, out.data_ptr<float>());
  clock.lap(NORMS);
  return out;
}

// x += o(attention(rotate(q), rotate(k), v)) for the rows of normed, the new k/v written to the layer's pools.
void DecodeStep::attention(const Layer& l, int64_t li, const at::Tensor& normed, float* xp, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& write_slots, const at::Tensor& slots, const at::Tensor& lengths,
                           Clock& clock) const {
  const int64_t B = normed.size(0), kv_size = kv_heads_ * head_dim_;
  // A gated head's q is followed by its gate in q_proj's output: the heads' q lie q_step values apart.
  const int64_t q_step = l.output_gate ? 2 * head_dim_ : head_dim_, q_out = heads_ * q_step;
  auto qkv = l.qkv(normed, gemv_max_rows_);  // [B, q (and gates) + 2 kv]
  clock.lap(QKV);
  TORCH_CHECK(qkv.size(1) == q_out + 2 * kv_size, "qkv projection of layer ", li, " has ", qkv.size(1), " outputs");
  const int64_t width = qkv.size(1);
  auto q = qkv.narrow(1, 0, q_out).view({B, heads_, q_step}).narrow(2, 0, head_dim_);
  auto k = qkv.narrow(1, q_out, kv_size).view({B, kv_heads_, head_dim_});
  auto v = qkv.narrow(1, q_out + kv_size, kv_size).view({B, kv_heads_, head_dim_});
  float* base = qkv.data_ptr<float>();
  if (l.q_norm.has_value()) {
    for (int64_t b = 0; b < B; ++b) {
      float* row = base + b * width;
      rms_norm(row, heads_, head_dim_, q_step, l.q_norm->data_ptr<float>(), eps_, row, q_step);
      rms_norm(row + q_out, kv_heads_, head_dim_, head_dim_, l.k_norm->data_ptr<float>(), eps_, row + q_out,
               head_dim_);
    }
  }
  const int64_t rotated = l.rotary_dim > 0 ? l.rotary_dim : head_dim_;
  rotary_(q.narrow(2, 0, rotated), cos, sin);
  rotary_(k.narrow(2, 0, rotated), cos, sin);
  const auto k_layer = k_pool.select(0, l.kv_index), v_layer = v_pool.select(0, l.kv_index);
  write_kv(k_layer, v_layer, k, v, write_slots);
  clock.lap(ROTARY_KV);
  const auto attn = decode_attention(q, k_layer, v_layer, slots, lengths, 1.0 / std::sqrt(double(head_dim_)));
  if (l.output_gate) {  // attention · σ(gate), head by head
    float* ap = attn.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads_; ++h) {
        const float* gate = base + b * width + h * q_step + head_dim_;
        float* o = ap + (b * heads_ + h) * head_dim_;
        for (int64_t j = 0; j < head_dim_; ++j) o[j] *= 1.0f / (1.0f + std::exp(-gate[j]));
      }
  }
  clock.lap(ATTENTION);
  const auto o = l.o(attn, gemv_max_rows_);
  clock.lap(O);
  add_into(xp, o, B * hidden_);
}

// x += out_proj(deltanet(in_proj(normed))) for a gated DeltaNet layer, its pooled states updated in place.
void DecodeStep::linear_attention(const DeltaNet& d, const at::Tensor& normed, float* xp, const at::Tensor& conv_pool,
                                  const at::Tensor& delta_pool, const at::Tensor& state_slots, Clock& clock) const {
  const auto mixed = d.in_qkv(normed, gemv_max_rows_), z = d.in_z(normed, gemv_max_rows_);
  const auto b = d.in_b(normed, gemv_max_rows_), a = d.in_a(normed, gemv_max_rows_);
  clock.lap(QKV);
  const auto gated = deltanet_decode_(mixed, z, b, a, state_slots, conv_pool.select(0, d.state_index),
                                      delta_pool.select(0, d.state_index), d.conv_weight, d.a_log, d.dt_bias,
                                      d.norm_weight, eps_, d.key_heads, d.tiled);
  clock.lap(DELTA_RULE);
  const auto o = d.out_proj(gated, gemv_max_rows_);
  clock.lap(O);
  TORCH_CHECK(o.size(1) == hidden_, "a DeltaNet layer's out_proj has ", o.size(1), " outputs");
  add_into(xp, o, normed.size(0) * hidden_);
}

// x[b] += the mixture's output for normed row b, as models/moe.py computes it: each expert that any row chose
// runs once over its rows, and the weighted outputs are summed in ascending expert order.
void DecodeStep::mixture(const Moe& m, const at::Tensor& normed, float* xp, Clock& clock) const {
  const int64_t B = normed.size(0), experts = static_cast<int64_t>(m.gate_up.size()), k = m.top_k;
  const auto logits = m.router(normed, gemv_max_rows_);  // [B, experts]
  TORCH_CHECK(logits.size(1) == experts, "router has ", logits.size(1), " outputs for ", experts, " experts");
  std::vector<std::vector<std::pair<int64_t, float>>> rows_of(experts);  // expert → (row, weight)
  const float* lp = logits.data_ptr<float>();
  std::vector<float> probs(experts);
  std::vector<int64_t> order(experts);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = lp + b * experts;
    const float top = *std::max_element(row, row + experts);
    float sum = 0.0f;
    for (int64_t e = 0; e < experts; ++e) sum += probs[e] = std::exp(row[e] - top);
    for (int64_t e = 0; e < experts; ++e) probs[e] /= sum;
    for (int64_t e = 0; e < experts; ++e) order[e] = e;
    // The k largest, the lower index first on ties (as torch.topk does on the CPU).
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t c) {
      return probs[a] > probs[c] || (probs[a] == probs[c] && a < c);
    });
    float chosen = 0.0f;
    for (int64_t j = 0; j < k; ++j) chosen += probs[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = order[j];
      rows_of[e].emplace_back(b, m.norm_topk ? probs[e] / chosen : probs[e]);
    }
  }
  clock.lap(ROUTER);
  auto out = at::zeros({B, hidden_}, normed.options());
  float* op = out.data_ptr<float>();
  const float* np = normed.data_ptr<float>();
  const auto expert_output = [&](int64_t e, const at::Tensor& x) {  // [rows, hidden]
    const auto gate_up = m.gate_up[e](x, gemv_max_rows_);
    TORCH_CHECK(gate_up.size(1) == 2 * m.width, "expert ", e, " gate/up has ", gate_up.size(1), " outputs");
    return m.down[e](silu_mul_in_place(gate_up, m.width), gemv_max_rows_);
  };
  if (B == 1 && at::get_num_threads() > 1) {
    // One token: its k experts are shared out between the threads whole, each run on one thread (the products'
    // own parallel_for runs inline there), rather than each small product split across the threads in turn: a
    // thread then streams several experts' weights back to back. Summed in ascending order as below.
    std::vector<int64_t> chosen;
    for (int64_t e = 0; e < experts; ++e)
      if (!rows_of[e].empty()) chosen.push_back(e);
    std::vector<at::Tensor> ys(chosen.size());
    at::parallel_for(0, static_cast<int64_t>(chosen.size()), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) ys[j] = expert_output(chosen[j], normed);
    });
    for (size_t j = 0; j < chosen.size(); ++j) {
      const float* yp = ys[j].data_ptr<float>();
      const float w = rows_of[chosen[j]][0].second;
      for (int64_t c = 0; c < hidden_; ++c) op[c] += yp[c] * w;
    }
  } else {
    for (int64_t e = 0; e < experts; ++e) {
      const auto& picks = rows_of[e];
      if (picks.empty()) continue;
      const int64_t n = static_cast<int64_t>(picks.size());
      at::Tensor xe = normed;
      if (n != B) {  // gather this expert's rows
        xe = at::empty({n, hidden_}, normed.options());
        float* xep = xe.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) std::copy_n(np + picks[i].first * hidden_, hidden_, xep + i * hidden_);
      }
      const auto y = expert_output(e, xe);
      const float* yp = y.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        float* o = op + picks[i].first * hidden_;
        const float* yr = yp + i * hidden_;
        const float w = picks[i].second;
        for (int64_t c = 0; c < hidden_; ++c) o[c] += yr[c] * w;
      }
    }
  }
  clock.lap(EXPERTS);
  if (m.shared) {
    const auto gate_up = m.shared_gate_up(normed, gemv_max_rows_);
    const auto y = m.shared_down(silu_mul_in_place(gate_up, m.shared_width), gemv_max_rows_);
    const auto g = m.shared_gate(normed, gemv_max_rows_);  // [B, 1]
    const float *yp = y.data_ptr<float>(), *gp = g.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float s = 1.0f / (1.0f + std::exp(-gp[b]));
      for (int64_t c = 0; c < hidden_; ++c) op[b * hidden_ + c] += s * yp[b * hidden_ + c];
    }
    clock.lap(EXPERTS);
  }
  add_into(xp, out, B * hidden_);
}

void DecodeStep::set_profiling(bool on) {
  profiling_ = on;
  seconds_.assign(PHASES, 0.0);
}

std::map<std::string, double> DecodeStep::profile() const {
  static const char* names[PHASES] = {"norms + residual", "qkv", "rotary + kv write", "attention", "o",
                                      "gate_up", "silu * up", "down", "router", "experts", "delta rule"};
  std::map<std::string, double> out;
  for (int i = 0; i < PHASES; ++i) out[names[i]] = seconds_.empty() ? 0.0 : seconds_[i];
  return out;
}

at::Tensor DecodeStep::check_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.numel() == n && t.device().is_cpu(), what,
              " weight must be CPU float32 with ", n, " values");
  return t.contiguous();
}

// The same two operations for the PyTorch layers (prefill), where each replaces several dispatched ops.
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && weight.dtype() == at::kFloat && x.device().is_cpu() &&
                  x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: x float32 [..., n] and weight float32 [n] on the CPU");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  auto y = at::empty_like(xc);
  const int64_t dim = xc.size(-1), rows = dim ? xc.numel() / dim : 0;
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    rms_norm(xp + r0 * dim, r1 - r0, dim, dim, wp, static_cast<float>(eps), yp + r0 * dim, dim);
  });
  return y;
}

// Index of the largest value, the first one on ties, as torch.argmax (which counts a NaN as largest: the first
// NaN wins). torch's reduction took ~2 ms for 8 rows of the demo model's 151936 logits here, ~5 % of a w8a8
// 8-stream step; this is one pass at memory speed.
static int64_t argmax_row(const float* x, int64_t n) {
  float best = -INFINITY;
  int64_t at = 0, j = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 vbest = _mm512_set1_ps(-INFINITY);
    __m512i vat = _mm512_setzero_si512();
    __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);  // strict: each lane keeps its first
      vbest = _mm512_mask_mov_ps(vbest, greater, v);
      vat = _mm512_mask_mov_epi32(vat, greater, index);
      index = _mm512_add_epi32(index, sixteen);
    }
    if (nan) j = 0;  // find the first NaN below
    else {
      alignas(64) float lane_best[16];
      alignas(64) int32_t lane_at[16];
      _mm512_store_ps(lane_best, vbest);
      _mm512_store_si512(lane_at, vat);
      for (int l = 0; l < 16; ++l)
        if (lane_best[l] > best || (lane_best[l] == best && lane_at[l] < at)) best = lane_best[l], at = lane_at[l];
    }
  }
#endif
  for (; j < n; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > best) best = x[j], at = j;
  }
  return at;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.device().is_cpu() && x.size(1) > 0,
              "argmax_rows: x must be CPU float32 [B, n] with n > 0");
  const auto xc = x.contiguous();
  const int64_t B = xc.size(0), n = xc.size(1);
  auto out = at::empty({B}, at::kLong);
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) op[b] = argmax_row(xp + b * n, n);
  });
  return out;
}

at::Tensor silu_mul_rows(const at::Tensor& gate_up) {  // [T, 2n] (gate, then up) → silu(gate) · up [T, n]
  TORCH_CHECK(gate_up.dtype() == at::kFloat && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 &&
                  gate_up.device().is_cpu(),
              "silu_mul: gate_up must be CPU float32 [T, 2n]");
  const auto g = gate_up.contiguous();
  const int64_t T = g.size(0), n = g.size(1) / 2;
  auto out = at::empty({T, n}, g.options());
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      silu_mul_to(gp + t * 2 * n, gp + t * 2 * n + n, op + t * n, n);
    }
  });
  return out;
}
