"""Model configuration: one dataclass, filled from a Hugging Face config.json or from GGUF metadata."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

# Architectures this version runs, by their Hugging Face class name and their GGUF name.
HF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3NextForCausalLM": "qwen3_next",
}
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                      "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe", "qwen3next": "qwen3_next",
                      # The language side of vision-language models (Qwen2-VL and Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE):
                      # their decoders with M-RoPE, which text alone turns into plain RoPE. The vision tower is a file
                      # of its own (weights/mmproj.py).
                      "qwen2vl": "qwen2", "qwen3vl": "qwen3", "qwen3vlmoe": "qwen3_moe", "qwen25vl": "qwen2"}
# The GGUF architectures whose language model takes a vision tower from llama.cpp's projector (mmproj) file, and
# the tower families each pairs with (weights/mmproj.py).
GGUF_VL_ARCHITECTURES = {
    "qwen2vl": ("qwen2_vl", "qwen2_5_vl"),
    "qwen25vl": ("qwen2_5_vl",),  # ollama's name for Qwen2.5-VL's language side (its tower inside the same file)
    "qwen3vl": ("qwen3_vl",),
    "qwen3vlmoe": ("qwen3_vl",),
    "qwen35": ("qwen3_vl",),  # Qwen3.5: Qwen3-VL's tower without DeepStack
    "qwen35moe": ("qwen3_vl",),
}
# Vision-language checkpoints: class name → (vision family, the decoder their language model is).
HF_VL_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "qwen2"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "qwen2"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "qwen3"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl", "qwen3_moe"),  # Qwen3-VL's tower, a Qwen3-MoE decoder
    # Qwen3.5 is natively multimodal: Qwen3-VL's tower without DeepStack, and Qwen3-VL's prompts and positions.
    "Qwen3_5ForConditionalGeneration": ("qwen3_vl", "qwen3_5"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_vl", "qwen3_5_moe"),
}
VL_MODEL_TYPES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
_DECODER_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                    "qwen3_5": "Qwen3_5ForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForCausalLM"}


@dataclass
class RopeConfig:
    theta: float = 1_000_000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # M-RoPE (vision-language models): rotary pairs split between the (time, height, width) position axes,
    # either in three contiguous sections (Qwen2-VL, 2.5-VL) or interleaved t,h,w,t,h,w… (Qwen3-VL).
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False


@dataclass
class VisionLinks:
    """What a vision-language model's language side needs to know about its vision side."""

    family: str  # "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"
    vision_config: dict[str, Any]  # config.json's vision_config, read by models/vision.py
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tokens_per_second: float  # Qwen2.5-VL: temporal positions per second of video
    spatial_merge_size: int


@dataclass
class MoeConfig:
    """The mixture of experts that replaces the MLP of some layers (Qwen2-MoE, Qwen3-MoE): a router scores every
    expert per token, the top `experts_per_token` run, and their outputs are summed weighted by the router's
    softmax (renormalised over the chosen ones if `norm_topk_prob`). Qwen2-MoE adds an always-on shared expert
    whose output is scaled by a sigmoid gate."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: frozenset[int]  # the layers whose MLP is the mixture; the others keep a dense MLP
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen3-MoE)

    def __post_init__(self) -> None:  # both config.json and GGUF metadata come through here
        if self.sparse_layers and not 0 < self.experts_per_token <= self.num_experts:
            raise ModelLoadError(f"num_experts_per_tok={self.experts_per_token} must be between 1 and "
                                 f"num_experts={self.num_experts}")


@dataclass
class LinearAttentionConfig:
    """Qwen3.5's hybrid layout: most layers mix tokens with a gated DeltaNet (linear attention with a recurrent
    state per sequence, models/gated_deltanet.py) instead of softmax attention over a KV cache."""

    layers: frozenset[int]  # the layers that are linear attention; the others keep (gated) softmax attention
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int  # width of the causal depthwise convolution over q/k/v
    # Value heads in tiled order (llama.cpp's qwen35 files: value head j reads key head j mod Hk) instead of
    # grouped (Hugging Face: j reads key head j div Hv/Hk). The same model with its value heads renumbered.
    tiled_value_heads: bool = False

    def __post_init__(self) -> None:
        if self.num_value_heads % self.num_key_heads:
            raise ModelLoadError(f"linear_num_value_heads={self.num_value_heads} is not a multiple of "
                                 f"linear_num_key_heads={self.num_key_heads}")
        if self.conv_kernel < 1:
            raise ModelLoadError(f"linear_conv_kernel_dim={self.conv_kernel} must be at least 1")

    @property
    def conv_channels(self) -> int:  # q, k and v side by side
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim


@dataclass
class ModelConfig:
    architecture: str  # "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_5", "qwen3_5_moe" or "qwen3_next"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on each head of q and k (Qwen3)
    rope: RopeConfig = field(default_factory=RopeConfig)
    vision: VisionLinks | None = None  # set for vision-language models
    moe: MoeConfig | None = None  # set for mixture-of-experts models
    # Qwen3.5 and Qwen3-Next: linear-attention layers, a sigmoid gate on the softmax attention's output, RMSNorms that scale
    # by (1 + weight), and rotary angles on only the first `rotary_dim` values of each head.
    linear_attention: LinearAttentionConfig | None = None
    attention_output_gate: bool = False
    zero_centered_norm: bool = False
    partial_rotary_factor: float = 1.0

    @property
    def family(self) -> str:
        """The dense family the attention and chat format come from: "qwen2", "qwen3" or "qwen3_5"."""
        return self.architecture.removesuffix("_moe")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_layers(self) -> list[int]:
        """The layers with softmax attention, in order: the only ones that keep keys and values."""
        linear = self.linear_attention.layers if self.linear_attention is not None else frozenset()
        return [i for i in range(self.num_layers) if i not in linear]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        vl_arch = next((a for a in archs if a in HF_VL_ARCHITECTURES), None)
        # A config without a known class name is told by its model_type. (Not the language side of a VL config:
        # released Qwen2-VL / 2.5-VL configs keep the VL model_type at the top level, among the text keys.)
        if vl_arch is None and cfg.get("model_type") in VL_MODEL_TYPES and not any(a in HF_ARCHITECTURES for a in archs):
            vl_arch = VL_MODEL_TYPES[cfg["model_type"]]
        if vl_arch is not None:
            return cls._from_hf_vl(cfg, vl_arch)
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            model_type = str(cfg.get("model_type", "")).removesuffix("_text")  # qwen3_5_text: Qwen3.5's text config
            arch = model_type if model_type in HF_ARCHITECTURES.values() else None
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}: "
                f"this version runs {', '.join(HF_ARCHITECTURES)}"
            )
        if cfg.get("use_sliding_window"):
            raise ModelLoadError("config.json sets use_sliding_window=true, which this version does not run")
        hidden = _req(cfg, "hidden_size")
        heads = _req(cfg, "num_attention_heads")
        layers = _req(cfg, "num_hidden_layers")
        moe = _moe_from_hf(cfg, layers) if arch.endswith("_moe") or arch == "qwen3_next" else None
        if arch == "qwen2_moe":
            bias = bool(cfg.get("qkv_bias", True))
        else:
            bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
        hybrid = arch.startswith("qwen3_5") or arch == "qwen3_next"
        if arch == "qwen3_5_moe":  # Qwen3.5-MoE: every layer sparse, the router always renormalises
            moe.norm_topk_prob = True
            moe.sparse_layers = frozenset(range(layers))
        return cls(
            architecture=arch,
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 0) if moe else _req(cfg, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=arch.startswith("qwen3"),
            rope=_rope_from_hf(cfg),
            moe=moe,
            linear_attention=_linear_attention_from_hf(cfg, layers) if hybrid else None,
            attention_output_gate=hybrid and bool(cfg.get("attn_output_gate", True)),
            zero_centered_norm=hybrid,
            partial_rotary_factor=float(_rope_params(cfg).get("partial_rotary_factor",
                                                              cfg.get("partial_rotary_factor", 0.25 if hybrid else 1.0))),
        )

    @classmethod
    def _from_hf_vl(cls, cfg: dict[str, Any], arch: str) -> ModelConfig:
        family, decoder = HF_VL_ARCHITECTURES[arch]
        # Hub configs of Qwen2-VL / 2.5-VL keep the language model's keys at the top level; Qwen3-VL and
        # transformers 5 nest them in text_config. The nested values win where both exist.
        top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
        text = {**top, **(cfg.get("text_config") or {})}
        text["architectures"] = [_DECODER_CLASSES[decoder]]
        if decoder == "qwen3_moe":  # Qwen3-VL-MoE's router always renormalises (it has no norm_topk_prob)
            text["norm_topk_prob"] = True
        if "tie_word_embeddings" in cfg:  # transformers 4 reads it from text_config, 5 from the top level
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        if "vision_config" not in cfg:
            raise ModelLoadError(f"{arch} config lacks vision_config")
        config = cls.from_hf(text)
        rope = config.rope
        section = _rope_params(text).get("mrope_section")
        if not section or len(section) != 3 or sum(section) != config.rotary_dim // 2:
            raise ModelLoadError(f"mrope_section {section!r} must have three parts summing to the rotary pairs "
                                 f"of a head ({config.rotary_dim // 2})")
        rope.mrope_section = tuple(int(s) for s in section)
        # transformers decides the layout by class, not by the config's mrope_interleaved flag; so do we.
        rope.mrope_interleaved = family == "qwen3_vl"
        vision = dict(cfg["vision_config"])
        if decoder.startswith("qwen3_5"):  # Qwen3.5's tower taps no DeepStack features (Qwen3-VL's default does)
            vision.setdefault("deepstack_visual_indexes", [])
        config.vision = VisionLinks(
            family=family,
            vision_config=vision,
            image_token_id=int(cfg.get("image_token_id", text.get("image_token_id", 151655))),
            video_token_id=int(cfg.get("video_token_id", text.get("video_token_id", 151656))),
            vision_start_token_id=int(cfg.get("vision_start_token_id", text.get("vision_start_token_id", 151652))),
            vision_end_token_id=int(cfg.get("vision_end_token_id", text.get("vision_end_token_id", 151653))),
            tokens_per_second=float(vision.get("tokens_per_second", 2 if family == "qwen2_5_vl" else 1)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        )
        return config

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], vocab_size: int, tensor_names: Iterable[str]) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r}: this version runs {', '.join(GGUF_ARCHITECTURES)}"
            )
        names = set(tensor_names)

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        # Multi-token-prediction layers (Qwen3.5) are written after the model's own: not run here.
        layers = int(get("block_count")) - int(meta.get(f"{arch}.nextn_predict_layers") or 0)
        hybrid = arch.startswith("qwen35") or arch == "qwen3next"
        moe = None
        if arch.endswith("moe") or arch == "qwen3next":
            # llama.cpp renormalises the chosen experts' weights for qwen3moe and qwen35moe and not for qwen2moe,
            # as the Hugging Face configs of the released models do; a file may say otherwise.
            norm = meta.get(f"{arch}.expert_weights_norm", arch != "qwen2moe")
            moe = MoeConfig(
                num_experts=int(get("expert_count")),
                experts_per_token=int(get("expert_used_count")),
                expert_intermediate_size=int(get("expert_feed_forward_length")),
                norm_topk_prob=bool(norm),
                sparse_layers=frozenset(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in names),
                shared_expert_intermediate_size=int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0),
            )
        rope = RopeConfig(theta=float(get("rope.freq_base", 1_000_000.0)))
        if meta.get(f"{arch}.rope.scaling.type") == "yarn":
            rope.kind = "yarn"
            rope.factor = float(get("rope.scaling.factor"))
            rope.original_max_position = int(get("rope.scaling.original_context_length"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
        rotary = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
        return cls(
            architecture=GGUF_ARCHITECTURES[arch],
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(meta.get(f"{arch}.feed_forward_length") or 0) if moe else int(get("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_kv_heads(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 32768)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias=arch.startswith("qwen2"),
            qk_norm=arch.startswith("qwen3"),
            rope=rope,
            moe=moe,
            linear_attention=_linear_attention_from_gguf(meta, arch, layers) if hybrid else None,
            attention_output_gate=hybrid,
            # llama.cpp's converter stores these RMSNorms' weights as 1 + w: plain RMSNorms over the file's values.
            zero_centered_norm=False,
            partial_rotary_factor=rotary / head_dim,
        )


def _kv_heads(value: Any) -> int:
    """attention.head_count_kv: a number, or (ollama's published Qwen3.5 / Qwen3-Next files) one per layer, 0 for the
    linear-attention layers; the attention layers all have the same count."""
    if isinstance(value, list):
        counts = {int(v) for v in value if v}
        if len(counts) != 1:
            raise ModelLoadError(f"attention.head_count_kv {value!r}: the attention layers must agree on one count")
        return counts.pop()
    return int(value)


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ModelLoadError(f"config.json lacks {key!r}")
    return cfg[key]


def _moe_from_hf(cfg: dict[str, Any], layers: int) -> MoeConfig:
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    sparse = frozenset(i for i in range(layers) if experts > 0 and i not in dense and (i + 1) % step == 0)
    moe = MoeConfig(
        num_experts=experts,
        experts_per_token=int(_req(cfg, "num_experts_per_tok")),
        expert_intermediate_size=int(_req(cfg, "moe_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        sparse_layers=sparse,
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
    )
    if len(sparse) < layers and not cfg.get("intermediate_size"):
        raise ModelLoadError("config.json lacks 'intermediate_size', which its dense (mlp_only) layers need")
    return moe


def _linear_attention_from_hf(cfg: dict[str, Any], layers: int) -> LinearAttentionConfig:
    kinds = cfg.get("layer_types")
    if kinds is None:  # older configs give the period of the full-attention layers instead
        interval = int(cfg.get("full_attention_interval") or 4)
        kinds = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if len(kinds) != layers or set(kinds) - {"full_attention", "linear_attention"}:
        raise ModelLoadError(f"layer_types must name full_attention or linear_attention for each of {layers} layers")
    return LinearAttentionConfig(
        layers=frozenset(i for i, kind in enumerate(kinds) if kind == "linear_attention"),
        num_key_heads=int(cfg.get("linear_num_key_heads", 16)),
        num_value_heads=int(cfg.get("linear_num_value_heads", 32)),
        key_head_dim=int(cfg.get("linear_key_head_dim", 128)),
        value_head_dim=int(cfg.get("linear_value_head_dim", 128)),
        conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)),
    )


def _linear_attention_from_gguf(meta: dict[str, Any], arch: str, layers: int) -> LinearAttentionConfig:
    def get(key: str) -> int:
        if f"{arch}.{key}" not in meta:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return int(meta[f"{arch}.{key}"])

    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if recurrent is not None:
        linear = frozenset(i for i, flag in enumerate(list(recurrent)[:layers]) if flag)
    else:
        interval = int(meta.get(f"{arch}.full_attention_interval") or 4)
        linear = frozenset(i for i in range(layers) if (i + 1) % interval)
    value_heads = get("ssm.time_step_rank")
    return LinearAttentionConfig(
        layers=linear,
        num_key_heads=get("ssm.group_count"),
        num_value_heads=value_heads,
        key_head_dim=get("ssm.state_size"),
        value_head_dim=get("ssm.inner_size") // value_heads,
        conv_kernel=get("ssm.conv_kernel"),
        # The converter reorders them for qwen35 / qwen35moe whenever key and value heads differ in number; its
        # qwen3next files keep the grouped order (and b/a fused, as the Hugging Face checkpoints have them).
        tiled_value_heads=arch != "qwen3next",
    )


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta inside); checkpoints on the Hub use `rope_theta` + `rope_scaling`.
    return {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    params = _rope_params(cfg)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10_000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "mrope":  # Qwen2-VL's Hub spelling: plain rotary frequencies, split over three position axes
        kind = "default"
    if kind not in ("default", "yarn"):
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: default, yarn)")
    rope = RopeConfig(theta=float(theta), kind=kind)
    if kind == "yarn":
        rope.factor = float(params.get("factor", 1.0))
        rope.original_max_position = int(
            params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 32768)
        )
        rope.beta_fast = float(params.get("beta_fast") or 32.0)
        rope.beta_slow = float(params.get("beta_slow") or 1.0)
        rope.attention_factor = params.get("attention_factor")
        rope.mscale = params.get("mscale")
        rope.mscale_all_dim = params.get("mscale_all_dim")
        rope.truncate = bool(params.get("truncate", True))
    return rope
