"""Model configuration: one dataclass, filled from a Hugging Face config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

# Architectures this version runs, by their Hugging Face class name and their GGUF name.
HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
GGUF_ARCHITECTURES = ("qwen2", "qwen3")


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


@dataclass
class ModelConfig:
    architecture: str  # "qwen2" or "qwen3"
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

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            arch = {"qwen2": "qwen2", "qwen3": "qwen3"}.get(cfg.get("model_type", ""))
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}: "
                f"this version runs {', '.join(HF_ARCHITECTURES)}"
            )
        if cfg.get("use_sliding_window"):
            raise ModelLoadError("config.json sets use_sliding_window=true, which this version does not run")
        hidden = _req(cfg, "hidden_size")
        heads = _req(cfg, "num_attention_heads")
        return cls(
            architecture=arch,
            vocab_size=_req(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(cfg, "intermediate_size"),
            num_layers=_req(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            rope=_rope_from_hf(cfg),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], vocab_size: int, has_output: bool) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r}: this version runs {', '.join(GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        rope = RopeConfig(theta=float(get("rope.freq_base", 1_000_000.0)))
        if meta.get(f"{arch}.rope.scaling.type") == "yarn":
            rope.kind = "yarn"
            rope.factor = float(get("rope.scaling.factor"))
            rope.original_max_position = int(get("rope.scaling.original_context_length"))
        return cls(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 32768)),
            tie_word_embeddings=not has_output,
            attention_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            rope=rope,
        )


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ModelLoadError(f"config.json lacks {key!r}")
    return cfg[key]


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); checkpoints on the Hub use `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10_000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
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
