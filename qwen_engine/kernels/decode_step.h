// DecodeStep: every decoder layer of a decode step in one native call (decode_step.cpp).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tensors.h"

class DecodeStep {
 public:
  DecodeStep(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
             at::Tensor final_norm, int64_t gemv_max_rows);

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                 c10::optional<at::Tensor> k_norm, std::vector<at::Tensor> qkv, std::vector<int64_t> qkv_types,
                 c10::optional<at::Tensor> qkv_bias, std::vector<at::Tensor> o, std::vector<int64_t> o_types,
                 std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_types, std::vector<at::Tensor> down,
                 std::vector<int64_t> down_types);

  // A hybrid model's gated DeltaNet layer (Qwen3.5; models/gated_deltanet.py): `projections` are the weight
  // segments of in_proj_qkv, in_proj_z, in_proj_b, in_proj_a and out_proj, in that order; `state_index` is its
  // row in the recurrent state pools. The MLP is as in add_layer (or set_moe).
  void add_linear_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<std::vector<at::Tensor>> projections,
                        std::vector<std::vector<int64_t>> projection_types, at::Tensor conv_weight, at::Tensor a_log,
                        at::Tensor dt_bias, at::Tensor norm_weight, int64_t key_heads, bool tiled,
                        int64_t state_index, std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_types,
                        std::vector<at::Tensor> down, std::vector<int64_t> down_types);

  // A softmax-attention layer of a hybrid model: its row in the KV pools, the values of each head rotated (the
  // first rotary_dim), and Qwen3.5's output gate (q_proj gives each head's q, then its gate: attention · σ(gate)).
  void set_attention(int64_t li, int64_t kv_index, int64_t rotary_dim, bool output_gate);

  // Makes projection `which` (qkv, o, gate_up, down; in_qkv, in_z, in_b, in_a, out_proj of a DeltaNet layer;
  // experts.<e>.gate_up / down, shared_expert.gate_up / down of a mixture, after set_moe) of layer `li`
  // a w8a8 (or a8) product; `append`: a further int8 part of it, whose outputs follow the earlier parts' (a8
  // keeps a projection whose block types differ in their groups or packing as side-by-side parts).
  void set_int8(int64_t li, const std::string& which, at::Tensor weight, at::Tensor scales,
                c10::optional<at::Tensor> bias, int64_t group, int64_t packed_rows, c10::optional<at::Tensor> factors,
                c10::optional<at::Tensor> offsets, bool amx, int64_t planes, int64_t zero, bool append);

  // Makes layer `li`'s MLP a mixture of experts (its dense gate_up/down are then unused). Each expert is given
  // as its gate_up and down weight segments; `shared_*` is empty without a shared expert.
  void set_moe(int64_t li, std::vector<at::Tensor> router, std::vector<int64_t> router_types, int64_t top_k,
               bool norm_topk, int64_t width, std::vector<std::vector<at::Tensor>> gate_up,
               std::vector<std::vector<int64_t>> gate_up_types, std::vector<std::vector<at::Tensor>> down,
               std::vector<std::vector<int64_t>> down_types, std::vector<at::Tensor> shared_gate_up,
               std::vector<int64_t> shared_gate_up_types, std::vector<at::Tensor> shared_down,
               std::vector<int64_t> shared_down_types, std::vector<at::Tensor> shared_gate,
               std::vector<int64_t> shared_gate_types, int64_t shared_width);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [B, hidden] (the embeddings), cos/sin [B, rotary_dim], pools [attention layers, slots, kv_heads, head_dim];
  // returns the final-norm hidden states [B, hidden]. Each sequence's new k/v go to write_slots[b]; it attends
  // over slots[b, :lengths[b]]. Hybrid models also pass the recurrent state pools, conv [linear layers, slots,
  // channels, kernel - 1] and delta [linear layers, slots, Hv, Dk, Dv], and each sequence's slot in them.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pool,
                     const at::Tensor& v_pool, const at::Tensor& write_slots, const at::Tensor& slots,
                     const at::Tensor& lengths, const c10::optional<at::Tensor>& conv_pool,
                     const c10::optional<at::Tensor>& delta_pool, const c10::optional<at::Tensor>& state_slots) const;

  // Seconds spent in each part of forward() since profiling was switched on (benchmarks/profile_decode.py).
  void set_profiling(bool on);
  std::map<std::string, double> profile() const;

 private:
  enum Phase { NORMS, QKV, ROTARY_KV, ATTENTION, O, GATE_UP, SILU, DOWN, ROUTER, EXPERTS, DELTA_RULE, PHASES };

  struct Clock {  // adds the time since the previous lap to a phase, when profiling
    std::vector<double>* seconds;
    std::chrono::steady_clock::time_point last;
    void lap(Phase phase) {
      if (!seconds) return;
      const auto now = std::chrono::steady_clock::now();
      (*seconds)[phase] += std::chrono::duration<double>(now - last).count();
      last = now;
    }
  };

  struct Linear {
    std::vector<at::Tensor> blocks;
    std::vector<int64_t> qtypes;
    c10::optional<at::Tensor> bias;
    // The w8a8 mode (int8_matmul.cpp): packed_rows int8 rows (+ 128), packed in the layout models/w8a8.py chose
    // for this CPU (AMX tiles where they run, else units of 8 or 16 rows), their scales, x (times the layer's
    // smoothing factors, if any) quantised in groups of `group`. The a8 mode (models/a8.py) packs in units of rows
    // even where AMX runs (its groups of 16-32 values are below a tile's 64), K-quant weights add offsets, and
    // with AVX-512 a weight of 4- or 5-bit quants is kept in nibble units (planes >= 0, codes around `zero`).
    at::Tensor int8_weight, int8_scales;
    int64_t group = 0, packed_rows = 0;
    c10::optional<at::Tensor> int8_factors, int8_offsets;
    bool int8_amx = false;
    int64_t int8_planes = -1, int8_zero = 128;
    std::vector<Linear> parts;  // more int8 products side by side (set_int8's append): outputs concatenated
    at::Tensor operator()(const at::Tensor& x, int64_t gemv_max_rows) const;
  };

  // A mixture of experts in place of the MLP (models/moe.py): the router's softmax picks top_k experts per row,
  // their outputs are summed with those probabilities as weights (renormalised if norm_topk), plus Qwen2-MoE's
  // shared expert scaled by sigmoid(shared_gate · x).
  struct Moe {
    Linear router;
    std::vector<Linear> gate_up, down;  // one per expert
    int64_t top_k = 0, width = 0;       // experts chosen per token; each expert's intermediate size
    bool norm_topk = false;
    bool shared = false;
    Linear shared_gate_up, shared_down, shared_gate;
    int64_t shared_width = 0;
  };

  // A gated DeltaNet token mixer (Qwen3.5's linear attention): its four input projections, what
  // deltanet_decode_ (delta_rule.cpp) needs between them and out_proj, and its row in the state pools.
  struct DeltaNet {
    Linear in_qkv, in_z, in_b, in_a, out_proj;
    at::Tensor conv_weight, a_log, dt_bias, norm_weight;
    int64_t key_heads = 0, state_index = 0;
    bool tiled = false;
  };

  struct Layer {
    at::Tensor input_norm, post_norm;
    c10::optional<at::Tensor> q_norm, k_norm;  // Qwen3
    Linear qkv, o, gate_up, down;
    std::shared_ptr<Moe> moe;  // set for the sparse layers of Qwen2-MoE / Qwen3-MoE
    std::shared_ptr<DeltaNet> deltanet;  // set for a hybrid's linear-attention layers (then qkv and o are unused)
    int64_t kv_index = 0, rotary_dim = 0;  // row in the KV pools; values rotated per head (0: all)
    bool output_gate = false;
  };

  void attention(const Layer& l, int64_t li, const at::Tensor& normed, float* xp, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& k_pool, const at::Tensor& v_pool,
                 const at::Tensor& write_slots, const at::Tensor& slots, const at::Tensor& lengths,
                 Clock& clock) const;
  void linear_attention(const DeltaNet& d, const at::Tensor& normed, float* xp, const at::Tensor& conv_pool,
                        const at::Tensor& delta_pool, const at::Tensor& state_slots, Clock& clock) const;

  void mixture(const Moe& m, const at::Tensor& normed, float* xp, Clock& clock) const;
  static Linear* expert_projection(Moe& m, const std::string& which);
  static at::Tensor check_vector(const at::Tensor& t, int64_t n, const char* what);

  int64_t hidden_, heads_, kv_heads_, head_dim_, intermediate_;
  float eps_;
  at::Tensor final_norm_;
  int64_t gemv_max_rows_;
  std::vector<Layer> layers_;
  bool profiling_ = false;
  mutable std::vector<double> seconds_;
};
