// The Python module: every kernel's function under the name the Python side calls it by.
//
// The only source that includes torch/extension.h (pybind11 and the tensor type casters): the kernel sources
// take the lighter tensors.h, so each compiles in seconds rather than the ~20 s this header alone takes to parse.

#include <torch/extension.h>

#include <string>

#include "decode_step.h"
#include "kernels.h"
#include "vec_math.h"  // QE_INT8: whether this build has the int8 products

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // quant_matmul.cpp
  m.def("linear", &linear, "x @ W^T (+ bias) with W in GGUF blocks, stacked from segments");
  m.def("dequantize", &dequantize, "a GGUF weight [rows, bytes] as float32 [rows, K]");
  m.def("dequantize_rows", &dequantize_rows, "selected rows of a GGUF weight as float32");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 kernels were compiled in");
  m.def("q5_0_as_q8_0", &q5_0_as_q8_0, "Q5_0 rows re-encoded as Q8_0 rows with the same values");
  m.def("q5_0_as_fields", &q5_0_as_fields, "Q5_0 rows re-laid in 5-bit fields (own type 1006), the same values");
  m.def("q6_k_as_fields", &q6_k_as_fields, "Q6_K rows re-laid in 6-bit fields (own type 1007), the same values");
  m.def("set_wide_vectors", &set_wide_vectors,
        "K-quant products at 3-8 rows on 16-lane (true) or 8-lane (false) kernels in AVX-512 builds; returns the old setting");
  m.def("prefers_fields", &prefers_fields, "whether loads should re-lay Q5_0 and Q6_K weights in fields (own types)");
  m.def("amx_prefill_available", &amx_prefill_available, "whether prefill products can run on AMX tiles here");
  m.def("set_amx_prefill", &set_amx_prefill, "use AMX for prefill products where available; returns the old setting");
  // paged_attention.cpp, prefill_attention.cpp
  m.def("decode_attention", &decode_attention, "one query token per sequence against its paged K/V slots");
  m.def("write_kv", &write_kv, "store new key/value rows at their slots of the pool");
  m.def("bf16_decode_products", &bf16_decode_products,
        "whether decode_attention multiplies a bfloat16 pool's rows as bf16 (head sizes 32, 64, 128)");
  m.def("rotary_", &rotary_, "rotate q or k (float32, or bfloat16 in float32) in place by per-token cos/sin tables");
  m.def("causal_softmax_", &causal_softmax_, "in place: scaled, causally masked softmax of prefill scores");
  m.def("prefill_attention", &prefill_attention, "a prompt chunk's causal attention over its paged K/V slots, fused");
  m.def("prefill_attention_supports", &prefill_attention_supports, "whether prefill_attention has a kernel for this head size");
  // bf16_ops.cpp, activations.cpp, segment_attention.cpp: the vision towers
  m.def("bf16_kernels", &bf16_kernels, "whether this build has the bfloat16 elementwise kernels");
  m.def("gelu_tanh_supports", &gelu_tanh_supports, "whether gelu_tanh_ runs on this tensor (its dtype, layout)");
  m.def("gelu_tanh_", &gelu_tanh_, "in place: gelu(x, approximate=\"tanh\") of a float32 or bf16 tensor");
  m.def("silu_mul_", &silu_mul_, "in place: gate = silu(gate) * up, float32");
  m.def("segment_attention_supports", &segment_attention_supports, "whether segment_attention has a kernel for this head size (and int8 scores)");
  m.def("segment_attention", &segment_attention, "attention within packed segments (vision towers): bf16 products, or int8 scores");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMS norm of bfloat16 rows, rounded where the reference rounds");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of bfloat16 tensors, rounded as the two PyTorch ops round");
  // decode_step.cpp
  // module_local: another build loaded beside this one (benchmarks/kernels.py --baseline) registers its own
  py::class_<DecodeStep>(m, "DecodeStep", py::module_local(),
                         "all decoder layers of a decode step (one token per sequence)")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor, int64_t>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("add_linear_layer", &DecodeStep::add_linear_layer)
      .def("set_attention", &DecodeStep::set_attention)
      .def("set_int8", &DecodeStep::set_int8, py::arg("li"), py::arg("which"), py::arg("weight"), py::arg("scales"),
           py::arg("bias"), py::arg("group"), py::arg("packed_rows"), py::arg("factors"), py::arg("offsets"),
           py::arg("amx"), py::arg("planes"), py::arg("zero"), py::arg("append") = false)
      .def("set_moe", &DecodeStep::set_moe)
      .def_property_readonly("num_layers", &DecodeStep::num_layers)
      .def("set_profiling", &DecodeStep::set_profiling)
      .def("profile", &DecodeStep::profile)
      .def("forward", &DecodeStep::forward, py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("cos"),
           py::arg("sin"), py::arg("k_pool"), py::arg("v_pool"), py::arg("write_slots"), py::arg("slots"),
           py::arg("lengths"), py::arg("conv_pool") = py::none(), py::arg("delta_pool") = py::none(),
           py::arg("state_slots") = py::none());
  m.def("rms_norm", &rms_norm_rows, "x / sqrt(mean(x²) + eps) · weight over the last axis");
  m.def("silu_mul", &silu_mul_rows, "silu(gate) · up for gate_up [T, 2n]");
  m.def("argmax_rows", &argmax_rows, "each row's first largest value's index (NaN counts as largest), as torch.argmax");
  // delta_rule.cpp
  m.def("delta_rule_step_", &delta_rule_step_,
        "one token of the gated delta rule per sequence and value head, the state updated in place");
  m.def("deltanet_decode_", &deltanet_decode_,
        "a gated DeltaNet layer's decode step between its projections, the pooled states updated in place");
  m.def("causal_conv_silu_", &causal_conv_silu_,
        "a prompt chunk's causal depthwise convolution and SiLU, token-major, the sequence's state updated in place");
  m.def("unit_lower_solve", &unit_lower_solve,
        "(I + L)^-1 B per head for a strictly lower L: the chunked delta rule's triangular system");
  // int8_matmul.cpp: the Python side offers the int8 modes only where these exist (models/a8.py, w8a8.py)
#if QE_INT8
  m.def("int8_has_amx", &int8_has_amx, "whether AMX tiles can run here (then weights are packed for them)");
  m.def("int8_linear_amx", &int8_linear_amx, "int8_linear_units with the weight packed for AMX tiles", py::arg("x"),
        py::arg("packed"), py::arg("N"), py::arg("weight_scales"), py::arg("bias"), py::arg("group"),
        py::arg("factors") = py::none());
  m.def("set_int8_amx_units", &set_int8_amx_units,
        "whether int8_linear_units runs 8+ rows of x on AMX tiles where granted (default on); returns the previous "
        "setting (false in builds without AMX)", py::arg("on"));
  m.def("int8_units_layout", []() { return std::string(QE_INT8 == 512 ? "units16" : "units"); },
        "the layout of int8 weights in units of rows here: units (8 rows, AVX2) or units16 (AVX-512 VNNI), "
        "models/w8a8.py");
  m.def("int8_linear_units", &int8_linear_units,
        "x @ W^T (+ bias), W int8 in units of 8 or 16 rows (or, planes >= 0, a8's nibble units of codes around zero), "
        "x (times factors, if given) quantised to int8 per group",
        py::arg("x"), py::arg("packed"), py::arg("N"), py::arg("weight_scales"), py::arg("bias"), py::arg("group"),
        py::arg("factors") = py::none(), py::arg("offsets") = py::none(), py::arg("planes") = -1,
        py::arg("zero") = 128);
  m.def("int8_quantize_weight", &int8_quantize_weight, "weight rows as int8 + 128 with one scale per group of each row",
        py::arg("w"), py::arg("group"));
  m.def("int8_quantize", &int8_quantize, "x (times factors, if given) as int8 in groups along each row: (q, scales, "
        "lane starts)", py::arg("x"), py::arg("group"), py::arg("factors") = py::none());
#endif
}
