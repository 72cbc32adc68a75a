"""llama.cpp's vision projector files (`mmproj-*.gguf`, architecture `clip`): the vision tower of a Qwen-VL GGUF.

llama.cpp keeps a vision-language model in two files: the language model (GGUF architecture `qwen2vl` for
Qwen2-VL and Qwen2.5-VL, `qwen3vl`, `qwen3vlmoe`, `qwen35`, `qwen35moe`) and the vision encoder with its merger.
This module reads the second back into the Hugging Face checkpoint's names and config keys, so the tower is
models/vision.py's, exactly as for a model folder.

What llama.cpp's converter changed, undone here:
- the Conv3d patch embedding is stored as two Conv2d kernels, one per frame of a temporal patch
  (`v.patch_embd.weight`, `v.patch_embd.weight.1`);
- Qwen2-VL's and Qwen2.5-VL's fused qkv is split into attn_q / attn_k / attn_v (Qwen3-VL's stays attn_qkv);
- DeepStack mergers are numbered by the block they tap (`v.deepstack.8.*`), not by their place in the list;
- Qwen2.5-VL's full-attention blocks are stored as their period (`clip.vision.n_wa_pattern`);
- Qwen2-VL's feed_forward_length holds the LLM's width, so the MLP's is read off its weight.
What the file does not hold takes the value every released checkpoint has: 2 frames per temporal patch,
112-pixel windows, Qwen2.5-VL's 2 temporal positions per second, and the pixel bounds of the released
preprocessor configs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import GGUF_VL_ARCHITECTURES, ModelConfig, VisionLinks
from ..errors import ModelLoadError
from .gguf import GGUFFile, has_gguf_magic

# clip.projector_type → the tower family of models/vision.py
PROJECTORS = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl", "qwen3vl_merger": "qwen3_vl"}
# Released preprocessor configs of Qwen2-VL and Qwen2.5-VL (Qwen3-VL's are its family defaults already).
_RELEASED_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056)}
_RELEASED_WINDOW_PERIOD = 8  # Qwen2.5-VL: fullatt_block_indexes 7, 15, 23, 31 in every released size
_BLOCK = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)")
_DEEPSTACK = re.compile(r"v\.deepstack\.(\d+)\.(norm|fc1|fc2)\.(weight|bias)")
# Per-block tensors other than q/k/v: the HF module name in each family.
_MLP = {
    "qwen2_vl": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    "qwen2_5_vl": {"ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj"},
    "qwen3_vl": {"ffn_up": "mlp.linear_fc1", "ffn_down": "mlp.linear_fc2"},
}
_BLOCK_COMMON = {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj", "attn_qkv": "attn.qkv"}
_MERGER = {
    "qwen2_vl": {"v.post_ln": "merger.ln_q", "mm.0": "merger.mlp.0", "mm.2": "merger.mlp.2"},
    "qwen3_vl": {"v.post_ln": "merger.norm", "mm.0": "merger.linear_fc1", "mm.2": "merger.linear_fc2"},
}
_MERGER["qwen2_5_vl"] = _MERGER["qwen2_vl"]
_DEEPSTACK_PARTS = {"norm": "norm", "fc1": "linear_fc1", "fc2": "linear_fc2"}
# ollama's published files (the tower inside the model's GGUF): its names → llama.cpp's.
_OLLAMA_RENAMES = [("v.merger.ln_q.", "v.post_ln."), ("v.merger.mlp.0.", "mm.0."), ("v.merger.mlp.2.", "mm.2."),
                   ("v.merger.norm.", "v.post_ln."), ("v.merger.linear_fc1.", "mm.0."), ("v.merger.linear_fc2.", "mm.2."),
                   ("v.patch_embd_0.weight", "v.patch_embd.weight"), ("v.patch_embd_1.weight", "v.patch_embd.weight.1"),
                   ("v.patch_embed.bias", "v.patch_embd.bias"), ("v.pos_embed.weight", "v.position_embd.weight")]
_OLLAMA_BLOCK_RENAMES = [(".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.linear_fc1.", ".ffn_up."),
                         (".mlp.linear_fc2.", ".ffn_down.")]
_OLLAMA_DEEPSTACK = re.compile(r"v\.deepstack_merger(?:_list)?\.(\d+)\.(norm|linear_fc1|linear_fc2)\.(weight|bias)")
_OLLAMA_DEEPSTACK_PARTS = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}
# ollama's vision architectures: the GGUF architecture → the tower family.
_OLLAMA_FAMILIES = {"qwen25vl": "qwen2_5_vl", "qwen3vl": "qwen3_vl", "qwen3vlmoe": "qwen3_vl", "qwen35": "qwen3_vl",
                    "qwen35moe": "qwen3_vl"}
# M-RoPE sections of the released models, for published files whose metadata lacks them (ollama's translation
# layer assumes the same): Qwen3-VL's and Qwen3.5's.
_RELEASED_SECTIONS = {"qwen3vl": [24, 20, 20], "qwen3vlmoe": [24, 20, 20], "qwen35": [11, 11, 10],
                      "qwen35moe": [11, 11, 10]}
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Projector:
    """A vision tower read from a GGUF: its config in the Hugging Face spelling of config.json's vision_config,
    and the image settings in that of preprocessor_config.json. `layout` is "llama.cpp" (an mmproj file) or
    "ollama" (the tower inside the model's own file, as ollama's published vision models hold it)."""

    path: Path
    family: str  # "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"
    vision_config: dict[str, Any]
    processor: dict[str, Any]
    file: GGUFFile
    layout: str = "llama.cpp"
    mrope_section: list[int] | None = None  # (ollama layout) where the language model's metadata lacks them

    @property
    def deepstack_layers(self) -> list[int]:
        return list(self.vision_config.get("deepstack_visual_indexes", []))

    @property
    def has_bf16_matrices(self) -> bool:
        """Whether the tower's matrices are stored in bfloat16 (then its linear layers can keep them so)."""
        from gguf import GGMLQuantizationType

        return any(info.qtype == GGMLQuantizationType.BF16 and len(info.shape) == 2
                   for name, info in self.file.tensors.items() if name.startswith(("v.", "mm.")))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(tower parameter name, float32 values), names as models/vision.py's VisionTransformer has them."""
        names = self._canonical_names()  # llama.cpp's name → the file's
        deepstack = self.deepstack_layers
        for name, source in names.items():
            if name == "v.patch_embd.packed":  # ollama's Conv3d kept whole, out and in channels flattened together
                values = self._values(source)
                yield "patch_embed.proj.weight", values.reshape(-1, self.vision_config.get("in_channels", 3),
                                                                *values.shape[1:])
            elif name.startswith("v.patch_embd.weight"):
                if name == "v.patch_embd.weight":  # the two frames' kernels back into one Conv3d [out, C, 2, P, P]
                    if "v.patch_embd.weight.1" not in names:
                        raise ModelLoadError(f"{self.path}: the second frame's patch kernel is missing")
                    frames = [self._values(names[n]) for n in ("v.patch_embd.weight", "v.patch_embd.weight.1")]
                    yield "patch_embed.proj.weight", np.stack(frames, axis=2)
            elif name == "v.patch_embd.bias":
                yield "patch_embed.proj.bias", self._values(source)
            elif name == "v.position_embd.weight":
                yield "pos_embed.weight", self._values(source)
            elif (m := _BLOCK.fullmatch(name)) is not None:
                block, kind, attr = m.groups()
                if kind in ("attn_k", "attn_v"):
                    continue  # taken with attn_q
                if kind == "attn_q":  # q, k, v stored apart: back into the fused qkv
                    parts = [f"v.blk.{block}.attn_{p}.{attr}" for p in "qkv"]
                    if any(p not in names for p in parts):
                        raise ModelLoadError(f"{self.path}: vision block {block} lacks one of its q, k, v {attr}s")
                    yield f"blocks.{block}.attn.qkv.{attr}", np.concatenate([self._values(names[p]) for p in parts])
                    continue
                module = _BLOCK_COMMON.get(kind) or _MLP[self.family].get(kind)
                if module is None:
                    raise ModelLoadError(f"{self.path}: unexpected tensor {source} for a {self.family} tower")
                yield f"blocks.{block}.{module}.{attr}", self._values(source)
            elif (m := _DEEPSTACK.fullmatch(name)) is not None:
                layer, part, attr = int(m.group(1)), m.group(2), m.group(3)
                if layer not in deepstack:
                    raise ModelLoadError(f"{self.path}: {source} taps block {layer}, which the metadata does not "
                                         f"list among the DeepStack layers")
                yield f"deepstack_merger_list.{deepstack.index(layer)}.{_DEEPSTACK_PARTS[part]}.{attr}", self._values(source)
            else:
                prefix, _, attr = name.rpartition(".")
                module = _MERGER[self.family].get(prefix)
                if module is None:
                    raise ModelLoadError(f"{self.path}: unexpected tensor {source} for a {self.family} tower")
                yield f"{module}.{attr}", self._values(source)

    def _canonical_names(self) -> dict[str, str]:
        names = [n for n in self.file.tensor_names() if n.startswith(("v.", "mm."))]
        if self.layout == "llama.cpp":
            return {n: n for n in names}
        return {_from_ollama(n, self.deepstack_layers): n for n in names}

    def _values(self, name: str) -> np.ndarray:
        try:
            return self.file.dequantize(name)
        except ModelLoadError:
            raise
        except Exception as e:  # a truncated file shows up as a short buffer while dequantising
            raise ModelLoadError(f"{self.path}: damaged tensor data ({type(e).__name__}: {e})") from None


def _from_ollama(name: str, deepstack: list[int]) -> str:
    """An ollama-layout tower tensor's name in llama.cpp's mmproj layout (the renames of ollama's own
    translation layer, llama/compat/llama-ollama-compat.cpp, for its published qwen25vl, qwen3vl and qwen35
    files); "v.patch_embd.packed" for Qwen3-VL's whole Conv3d."""
    if name == "v.patch_embed.weight":
        return "v.patch_embd.packed"
    for old, new in _OLLAMA_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    if (m := _OLLAMA_DEEPSTACK.fullmatch(name)) is not None:
        k, part, attr = int(m.group(1)), m.group(2), m.group(3)
        if k >= len(deepstack):
            raise ModelLoadError(f"{name}: DeepStack merger {k}, but the metadata lists {len(deepstack)}")
        return f"v.deepstack.{deepstack[k]}.{_OLLAMA_DEEPSTACK_PARTS[part]}.{attr}"
    for old, new in _OLLAMA_BLOCK_RENAMES:
        name = name.replace(old, new)
    return name


def read_projector(path: str | Path) -> Projector:
    """Open a vision projector file and read its configuration (no tensor is read yet)."""
    path = Path(path)
    if not has_gguf_magic(path, "vision projector"):
        raise ModelLoadError(f"{path} is not a GGUF file, so not a vision projector (mmproj) file")
    file = GGUFFile(path)
    meta = file.metadata
    if file.architecture != "clip" or not meta.get("clip.has_vision_encoder", False):
        raise ModelLoadError(f"{path}: not a vision projector (general.architecture is {file.architecture!r}, "
                             f"an mmproj file's is 'clip' with a vision encoder)")
    kind = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    family = PROJECTORS.get(str(kind))
    if family is None:
        raise ModelLoadError(f"{path}: projector type {kind!r} is not a Qwen-VL one ({', '.join(PROJECTORS)})")

    def get(key: str) -> Any:
        value = meta.get(f"clip.vision.{key}")
        if value is None:
            raise ModelLoadError(f"{path}: metadata lacks clip.vision.{key}")
        return value

    depth, embed = int(get("block_count")), int(get("embedding_length"))
    # The MLP's width from its weight: the converter writes Qwen2-VL's feed_forward_length as the LLM's width.
    if "v.blk.0.ffn_up.weight" not in file.tensors:
        raise ModelLoadError(f"{path}: the projector has no v.blk.0.ffn_up.weight")
    ff = int(file.tensors["v.blk.0.ffn_up.weight"].shape[1])
    merge = int(meta.get("clip.vision.spatial_merge_size") or 2)
    vision: dict[str, Any] = {"depth": depth, "num_heads": int(get("attention.head_count")),
                              "patch_size": int(get("patch_size")), "spatial_merge_size": merge,
                              "temporal_patch_size": 2}
    out = int(get("projection_dim"))
    if family == "qwen2_vl":  # Qwen2-VL's config names the blocks' width embed_dim and the LLM's hidden_size
        ratio = ff / embed
        if int(embed * ratio) != ff:
            raise ModelLoadError(f"{path}: the MLP width {ff} is no ratio of embedding_length {embed}")
        vision.update(embed_dim=embed, hidden_size=out, mlp_ratio=ratio)
    else:
        vision.update(hidden_size=embed, intermediate_size=ff, out_hidden_size=out)
    if family == "qwen2_5_vl":
        period = int(meta.get("clip.vision.n_wa_pattern") or _RELEASED_WINDOW_PERIOD)
        vision.update(window_size=112, tokens_per_second=2,
                      fullatt_block_indexes=[i for i in range(depth) if (i + 1) % period == 0])
    if family == "qwen3_vl":
        if "v.position_embd.weight" not in file.tensors:
            raise ModelLoadError(f"{path}: a Qwen3-VL projector needs v.position_embd.weight")
        vision["num_position_embeddings"] = int(file.tensors["v.position_embd.weight"].shape[1])
        flags = meta.get("clip.vision.is_deepstack_layers") or []
        vision["deepstack_visual_indexes"] = [i for i, flag in enumerate(flags) if flag]
    processor: dict[str, Any] = {"patch_size": vision["patch_size"], "merge_size": merge, "temporal_patch_size": 2}
    for key in ("image_mean", "image_std"):
        if meta.get(f"clip.vision.{key}") is not None:
            processor[key] = [float(v) for v in meta[f"clip.vision.{key}"]]
    low, high = meta.get("clip.vision.image_min_pixels"), meta.get("clip.vision.image_max_pixels")
    if family in _RELEASED_PIXELS:
        low, high = low or _RELEASED_PIXELS[family][0], high or _RELEASED_PIXELS[family][1]
    if low and high:
        processor.update(min_pixels=int(low), max_pixels=int(high))
    return Projector(path, family, vision, processor, file)


def read_embedded(file: GGUFFile) -> Projector | None:
    """The vision tower inside a model's own GGUF, as ollama publishes its vision models (qwen25vl, qwen3vl,
    qwen3vlmoe, qwen35, qwen35moe: `v.*` tensors beside the language model's, `<arch>.vision.*` metadata); None
    for a file without one. Read as ollama's translation layer for llama.cpp reads these files; what they do not
    hold takes the released checkpoints' values."""
    arch = file.architecture
    meta = file.metadata
    family = _OLLAMA_FAMILIES.get(arch)
    if family is None or f"{arch}.vision.block_count" not in meta:
        return None
    path = file.path

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.vision.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata lacks {arch}.vision.{key}")
        return value

    def shape(name: str) -> tuple[int, ...]:
        if name not in file.tensors:
            raise ModelLoadError(f"{path}: the embedded vision tower has no {name}")
        return tuple(reversed(file.tensors[name].shape))

    qwen3 = family == "qwen3_vl"
    depth, embed = int(get("block_count")), int(get("embedding_length"))
    ff = shape("v.blk.0.mlp.linear_fc1.weight" if qwen3 else "v.blk.0.ffn_up.weight")[0]
    merge = int(get("spatial_merge_size", 2))
    vision: dict[str, Any] = {
        "depth": depth, "hidden_size": embed, "intermediate_size": ff, "num_heads": int(get("attention.head_count")),
        "out_hidden_size": int(meta[f"{arch}.embedding_length"]), "patch_size": int(get("patch_size", 16 if qwen3 else 14)),
        "spatial_merge_size": merge, "temporal_patch_size": int(get("temporal_patch_size", 2)),
        "in_channels": int(get("num_channels", 3) or 3), "rope_theta": float(get("rope.freq_base", 10000.0)),
    }
    if qwen3:
        vision["num_position_embeddings"] = shape("v.pos_embed.weight")[0]
        vision["deepstack_visual_indexes"] = [int(i) for i in get("deepstack_visual_indexes", [])]
    else:
        vision.update(window_size=int(get("window_size", 112)), tokens_per_second=2,
                      fullatt_block_indexes=[int(i) for i in get("fullatt_block_indexes", [7, 15, 23, 31])])
    processor: dict[str, Any] = {"patch_size": vision["patch_size"], "merge_size": merge,
                                 "temporal_patch_size": vision["temporal_patch_size"],
                                 "image_mean": [float(v) for v in get("image_mean", [0.5] * 3 if qwen3 else _CLIP_MEAN)],
                                 "image_std": [float(v) for v in get("image_std", [0.5] * 3 if qwen3 else _CLIP_STD)]}
    low, high = meta.get(f"{arch}.vision.shortest_edge"), meta.get(f"{arch}.vision.longest_edge")
    if family in _RELEASED_PIXELS:
        low, high = low or _RELEASED_PIXELS[family][0], high or _RELEASED_PIXELS[family][1]
    if low and high:
        processor.update(min_pixels=int(low), max_pixels=int(high))
    sections = meta.get(f"{arch}.rope.dimension_sections") or meta.get(f"{arch}.rope.mrope_section") \
        or _RELEASED_SECTIONS.get(arch)
    return Projector(path, family, vision, processor, file, layout="ollama", mrope_section=sections)


def attach(config: ModelConfig, text_meta: dict[str, Any], projector: Projector, tokenizer) -> None:
    """Make the language model's config a vision-language one with `projector`'s tower: M-RoPE sections from the
    GGUF, the special tokens' ids from its vocabulary. Raises ModelLoadError if the two files do not pair."""
    arch = str(text_meta.get("general.architecture"))
    families = GGUF_VL_ARCHITECTURES.get(arch)
    if families is None:
        raise ModelLoadError(
            f"the language model is a {arch!r} GGUF, which takes no vision tower; llama.cpp writes the language "
            f"side of a Qwen vision-language model as {', '.join(GGUF_VL_ARCHITECTURES)}")
    if projector.family not in families:
        raise ModelLoadError(f"{projector.path}: a {projector.family} projector does not pair with a {arch!r} "
                             f"language model (it takes {' or '.join(families)})")
    out = projector.vision_config.get("out_hidden_size", projector.vision_config.get("hidden_size"))
    if out != config.hidden_size:
        raise ModelLoadError(f"{projector.path}: the projector's output width is {out}, the language model's "
                             f"{config.hidden_size}: they are not parts of the same model")
    # (A tower inside the model's own file is its own; ollama's files do not say how many DeepStack layers.)
    expected = int(text_meta.get(f"{arch}.n_deepstack_layers") or 0)
    if projector.layout == "llama.cpp" and len(projector.deepstack_layers) != expected:
        raise ModelLoadError(f"{projector.path}: the projector taps {len(projector.deepstack_layers)} DeepStack "
                             f"layers, the language model takes {expected}")
    sections = text_meta.get(f"{arch}.rope.dimension_sections") or projector.mrope_section
    if not sections or len(sections) < 3 or sum(sections[:3]) != config.rotary_dim // 2:
        raise ModelLoadError(f"{arch}.rope.dimension_sections {sections!r} must give three M-RoPE sections "
                             f"summing to the rotary pairs of a head ({config.rotary_dim // 2})")

    def token(text: str) -> int:
        token_id = tokenizer.token_to_id(text)
        if token_id is None:
            raise ModelLoadError(f"the language model's vocabulary lacks {text}, which vision prompts need")
        return int(token_id)

    links = VisionLinks(
        family=projector.family,
        vision_config=projector.vision_config,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tokens_per_second=float(projector.vision_config.get("tokens_per_second", 1)),
        spatial_merge_size=int(projector.vision_config["spatial_merge_size"]),
    )
    # Changed only now that nothing can fail: a projector found beside the file may be refused and the model run
    # on text alone.
    config.vision = links
    config.rope.mrope_section = tuple(int(s) for s in sections[:3])
    config.rope.mrope_interleaved = projector.family == "qwen3_vl"  # as transformers decides it: by family


def load_tower(tower: nn.Module, projector: Projector, dtype: torch.dtype, device: torch.device) -> None:
    """Fill `tower` (built on the meta device) with the projector's weights; each parameter exactly once."""
    params = dict(tower.named_parameters())
    seen: set[str] = set()
    for name, values in projector.tensors():
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"{projector.path}: holds {name}, which the {projector.family} tower its metadata "
                                 f"describes does not have")
        if name in seen:
            raise ModelLoadError(f"{projector.path}: holds the tower's {name} twice")
        if tuple(values.shape) != tuple(param.shape):
            raise ModelLoadError(f"{projector.path}: {name} has shape {tuple(values.shape)}, the metadata "
                                 f"describes {tuple(param.shape)}")
        module_name, _, attr = name.rpartition(".")
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=dtype)
        setattr(tower.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{projector.path}: the projector lacks the tower's {shown}")
