"""From a model name to a ready model: resolve the path, read config, tokenizer, template and weights.

A model is a GGUF file or a Hugging Face folder (config.json + safetensors); no name means the demo model.
Names of models in ollama's store or the Hugging Face cache are turned into such paths by weights/sources.py.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import kernels
from ..config import GGUF_VL_ARCHITECTURES, ModelConfig
from ..engine.sampling_params import SamplingParams
from ..errors import InputError, ModelLoadError
from ..models import a8, w8a8
from ..models.calibration import calibration_ids
from ..models.layers import RotaryEmbedding
from ..models.quant import QuantLinear
from ..models.qwen import QwenForCausalLM
from . import bf16_layers, experts, linear_projections, mmproj, w8a8_store
from .quantized import build_quantized, fuse_projections, tie_lm_head
from .sources import ModelSource, merge_defaults, resolve_source

# A GGUF carries no generation_config.json; these are the values Qwen publishes in it for each family's
# instruct models (Qwen2.5-Instruct, and Qwen3 in its default thinking mode).
log = logging.getLogger(__name__)

GGUF_DEFAULTS = {
    "qwen2": SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
    "qwen3": SamplingParams(temperature=0.6, top_p=0.95, top_k=20),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: QwenForCausalLM
    tokenizer: object  # text.tokenizer.QwenTokenizer
    chat_template: object  # text.template.ChatTemplate
    defaults: SamplingParams  # from generation_config.json (or the GGUF's family defaults)
    eos_token_ids: list[int] = field(default_factory=list)
    # A GGUF's vision projector: its image settings in preprocessor_config.json's spelling (a folder has the file)
    vision_processor: dict | None = None
    source: ModelSource | None = None  # where the model came from (demo, path, ollama, Hugging Face cache)
    system_prompt: str | None = None  # the source's default system message (ollama's system layer)
    max_model_len: int | None = None  # the source's default context length (ollama's num_ctx)


def resolve_model_path(model: str | Path | None, progress: bool = True) -> Path:
    """The GGUF file or folder that `model` names (see weights/sources.py for the accepted forms)."""
    return resolve_source(model, progress).path


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise ModelLoadError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def parse_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {str(dev)!r}; choose cpu or cuda")
    return dev


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    quantized: bool | None = None,
    quantization: str | None = None,
    mmproj: str | Path | None = None,
) -> LoadedModel:
    """Load a model. For a GGUF on CPU in float32, `quantized` (default: yes, unless QWEN_ENGINE_QUANTIZED=0)
    keeps the weights in the file's blocks, memory-mapped, and multiplies them with the native kernels;
    `quantized=False` dequantises everything to float32 at load (the reference path, and the only one for
    other dtypes and CUDA). Likewise a Hugging Face folder saved in bfloat16 and run on CPU in float32 keeps its
    linear weights in bfloat16 (exactly the float32 numbers, in half the memory) for the same kernels.

    `quantization="w8a8"` (or QWEN_ENGINE_QUANTIZATION=w8a8) is the optional lossy mode of models/w8a8.py:
    int8 weights and activations for throughput, with its accuracy cost measured by benchmarks/compare.py.
    "w8a8-vision" converts a vision tower too (int8 linear layers, bf16 attention products). "a8"
    (models/a8.py, GGUF models only) keeps the GGUF's weights exactly and rounds only the activations to int8,
    as llama.cpp does.

    `mmproj`: llama.cpp's vision projector file for a vision-language GGUF (weights/mmproj.py); by default the
    one an ollama model's manifest names, or the only `mmproj*.gguf` beside the model file."""
    if quantization is None:
        quantization = os.environ.get("QWEN_ENGINE_QUANTIZATION") or None
    modes = (*w8a8.MODES, a8.MODE)
    if quantization is not None and quantization not in modes:
        raise InputError(f"unknown quantization {quantization!r}; choose from {', '.join(modes)}")
    source = resolve_source(model, progress)
    if quantization == a8.MODE and source.path.is_dir():
        raise InputError("quantization='a8' keeps a GGUF's own quantised weights; a folder of float weights has "
                         "none (use w8a8)")
    projector = _projector_path(source, mmproj)
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    if quantization is not None and (torch_dtype != torch.float32 or torch_device.type != "cpu"):
        raise InputError(f"quantization={quantization!r} runs on the CPU in float32; drop --dtype/--device")
    if quantized is None:
        quantized = os.environ.get("QWEN_ENGINE_QUANTIZED", "1") != "0"
    kernels.use_available_cores()
    try:
        keep_blocks = quantized and torch_dtype == torch.float32 and torch_device.type == "cpu"
        if source.path.is_dir():
            keep_bf16 = keep_blocks and quantization is None and kernels.native() is not None
            loaded = _load_hf_folder(source.path, torch_dtype, torch_device, keep_bf16)
        else:
            loaded = _load_gguf(source.path, torch_dtype, torch_device, keep_blocks,
                                layers_replaced=quantization is not None, projector_path=projector)
    except ModelLoadError as e:
        if source.kind in ("ollama", "hf"):  # a blob name alone would not tell the user which model failed
            raise ModelLoadError(f"{source.name}: {e}") from None
        raise
    if quantization in w8a8.MODES and loaded.config.moe is not None:  # (its smoothing is calibrated per product)
        raise InputError(f"quantization={quantization!r} does not run mixture-of-experts models yet; drop it, or "
                         "use 'a8' (a GGUF's own weights, int8 activations)")
    if quantization == a8.MODE:
        if not any(isinstance(m, QuantLinear) for m in loaded.model.modules()):
            raise InputError("quantization='a8' keeps a GGUF's own quantised weights; this model has none "
                             "(use w8a8 for float checkpoints)")
        try:
            a8.convert(loaded.model, store=a8.store_path(source.path))
        except ValueError as e:
            raise ModelLoadError(f"quantization='a8': {e}") from None
        except MemoryError as e:
            raise InputError(f"quantization='a8': {e}") from None
    elif quantization is not None:
        calibration = calibration_ids(loaded.tokenizer)  # for the smoothing (models/w8a8.py); None if turned off
        w8a8.convert(loaded.model, store=w8a8_store.store_path(source.path, w8a8.store_kind(calibration)),
                     calibration=calibration)
        tower = getattr(loaded.model, "visual", None)
        if quantization == "w8a8-vision" and tower is not None:
            w8a8.convert_tower(tower)
    loaded.defaults = merge_defaults(source.defaults, loaded.defaults)
    loaded.source, loaded.system_prompt, loaded.max_model_len = source, source.system_prompt, source.max_model_len
    return loaded


def _projector_path(source: ModelSource, mmproj: str | Path | None) -> Path | None:
    if mmproj is not None:
        path = Path(mmproj).expanduser()
        if source.path.is_dir():
            raise InputError(f"mmproj names a vision projector for a GGUF; {source.name} is a model folder, whose "
                             f"vision tower (if any) is in the folder")
        if not path.is_file():
            raise ModelLoadError(f"vision projector {str(path)!r} does not exist")
        return path
    return source.mmproj


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device, keep_blocks: bool = False,
               layers_replaced: bool = False, projector_path: Path | None = None) -> LoadedModel:
    from ..text.template import ChatTemplate
    from ..text.tokenizer import QwenTokenizer
    from .gguf import GGUFFile, has_gguf_magic

    if not has_gguf_magic(path, "model file"):
        raise ModelLoadError(f"{path} is neither a GGUF file nor a Hugging Face model folder")
    gguf = GGUFFile(path)
    names = gguf.tensor_names()
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{path}: GGUF has no token_embd.weight tensor")
    vocab_size = int(gguf.tensors["token_embd.weight"].shape[1])
    try:
        config = ModelConfig.from_gguf(gguf.metadata, vocab_size, names)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    tokenizer = QwenTokenizer.from_gguf_metadata(gguf.metadata)
    template_source = gguf.metadata.get("tokenizer.chat_template")
    projector = _projector(gguf, projector_path, config, tokenizer)
    if projector is not None:
        if "<|image_pad|>" not in (template_source or ""):  # a text template would print no image placeholders
            from ..text.vl_template import VL_TEMPLATES

            template_source = VL_TEMPLATES[config.vision.family]
    template = ChatTemplate(template_source, tokenizer.special_tokens_map())
    if keep_blocks and kernels.native() is not None:
        model = build_quantized(config, gguf, path, layers_replaced)
    else:  # float32 throughout (without a compiler too: dequantising per call would be far slower)
        tensors = ((n, torch.from_numpy(a)) for n, a in _checked(gguf, config.num_layers))
        if config.architecture == "qwen3_next":
            tensors = _unfused(tensors, _split_projections(config), path)
        model = _build(config, tensors, dtype, device, path, tower_apart=True)
    if projector is not None:
        mmproj.load_tower(model.visual, projector, dtype, device)
        if keep_blocks and not layers_replaced and kernels.native() is not None and projector.has_bf16_matrices:
            bf16_layers.keep_linears(model.visual)  # as for bf16 folders: the same numbers from half the memory
        model.visual.reset_computed_state(device)
    eos = _eos_ids(tokenizer, [gguf.metadata.get("tokenizer.ggml.eos_token_id")])
    defaults = GGUF_DEFAULTS.get(config.family, GGUF_DEFAULTS["qwen3"])  # (Qwen3.5: Qwen3's thinking-mode values)
    return LoadedModel(path, config, model, tokenizer, template, defaults, eos,
                       vision_processor=projector.processor if projector is not None else None)


def _projector(gguf, chosen: Path | None, config: ModelConfig, tokenizer) -> mmproj.Projector | None:
    """The vision tower for a GGUF, attached to `config`: the projector file `chosen`; without one, the tower inside
    the file itself (ollama's published vision models), else, as LM Studio does, the only `mmproj*.gguf` beside a
    vision-language GGUF if it pairs with it (otherwise the model runs on text alone)."""
    path, meta = gguf.path, gguf.metadata
    if chosen is None and (embedded := mmproj.read_embedded(gguf)) is not None:
        try:
            mmproj.attach(config, meta, embedded, tokenizer)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: its vision tower: {e}") from None
        return embedded
    if chosen is None:
        if meta.get("general.architecture") not in GGUF_VL_ARCHITECTURES:
            return None
        found = sorted(p for p in path.parent.glob("*.gguf") if p.name.lower().startswith("mmproj"))
        if len(found) != 1 or found[0] == path:
            return None
        try:
            projector = mmproj.read_projector(found[0])
            mmproj.attach(config, meta, projector, tokenizer)
        except ModelLoadError as e:
            log.warning("%s lies beside %s but is not its vision projector (%s): text only", found[0], path, e)
            return None
        return projector
    projector = mmproj.read_projector(chosen)
    try:
        mmproj.attach(config, meta, projector, tokenizer)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path} with {chosen}: {e}") from None
    return projector


def _checked(gguf, layers: int) -> Iterable[tuple[str, np.ndarray]]:
    try:
        yield from gguf.hf_tensors(layers)
    except ModelLoadError:
        raise
    except Exception as e:  # a truncated file shows up as a short buffer while dequantising
        raise ModelLoadError(f"{gguf.path}: damaged tensor data ({type(e).__name__}: {e})") from None


def _load_hf_folder(path: Path, dtype: torch.dtype, device: torch.device, keep_bf16: bool = False) -> LoadedModel:
    from ..text.template import ChatTemplate, load_chat_template
    from ..text.tokenizer import QwenTokenizer
    from .safetensors import iter_tensors

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    raw_config = _read_json(config_file)
    try:
        config = ModelConfig.from_hf(raw_config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{config_file}: {e}") from None
    tokenizer = QwenTokenizer.from_dir(path)
    template_source = load_chat_template(path)
    if template_source is None and config.vision is not None:
        from ..text.vl_template import VL_TEMPLATES

        template_source = VL_TEMPLATES[config.vision.family]
    template = ChatTemplate(template_source, tokenizer.special_tokens_map())
    tensors = iter_tensors(path)
    if config.moe is not None:
        v5 = str(raw_config.get("transformers_version", "")).startswith("5")
        tensors = _unfused(tensors, _split_experts(config, v5), path)
    if config.architecture == "qwen3_next":
        tensors = _unfused(tensors, _split_projections(config), path)
    model = _build(config, tensors, dtype, device, path, keep_bf16)
    gen = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    defaults = _defaults_from_generation_config(gen)
    eos = gen.get("eos_token_id")
    eos = _eos_ids(tokenizer, eos if isinstance(eos, list) else [eos])
    return LoadedModel(path, config, model, tokenizer, template, defaults, eos)


def _build(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
    path: Path,
    keep_bf16: bool = False,
    tower_apart: bool = False,
) -> QwenForCausalLM:
    """`tower_apart`: a vision tower comes from a file of its own (a GGUF's projector), loaded afterwards."""
    # Built on the meta device, then filled tensor by tensor: memory never holds more than the final weights
    # plus the one tensor being converted.
    with torch.device("meta"):
        model = QwenForCausalLM(config)
    expected = {name for name, _ in model.named_parameters() if not (tower_apart and name.startswith("visual."))}
    loaded = set()
    kept: dict[str, torch.Tensor] = {}  # module name → its bfloat16 weight, for bf16_layers.keep
    for name, tensor in tensors:
        name = _local_name(name)
        if name.startswith("mtp."):  # Qwen3.5's multi-token-prediction head: for speculative decoding, unused
            continue
        if name in loaded:
            raise ModelLoadError(f"{path}: the checkpoint holds tensor {name} twice")
        if name not in expected:
            if ".mlp.experts." in name:  # skipping it would silently drop an expert the router can choose
                raise ModelLoadError(f"{path}: the checkpoint holds {name}, more experts than config.json declares")
            continue  # e.g. rotary inv_freq saved by old exporters, or vision towers of other families
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attr)
        if tuple(current.shape) == (1, *tensor.shape):  # a one-row weight written as a vector (GGUF)
            tensor = tensor.reshape(current.shape)
        if tuple(current.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(current.shape)}"
            )
        if keep_bf16 and attr == "weight" and bf16_layers.can_keep(module_name, module, tensor,
                                                                  pad=module_name.startswith("visual.")):
            kept[module_name] = tensor
            loaded.add(name)
            continue
        setattr(module, attr, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
    if kept:
        bf16_layers.keep(model, kept, path)
        fuse_projections(model)
    if config.tie_word_embeddings or "lm_head.weight" not in loaded:
        if "model.embed_tokens.weight" in loaded:
            tie_lm_head(model)
            loaded.add("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{path}: checkpoint lacks tensors {shown}")
    # Rotary tables are computed, not loaded: build them for real now that we left the meta device.
    model.model.rotary = RotaryEmbedding(config.rope, config.rotary_dim).to(device)
    if config.vision is not None:
        model.visual.reset_computed_state(device)
    return model.eval()


def _unfused(tensors: Iterable[tuple[str, torch.Tensor]], split, path: Path) -> Iterable[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each fused one replaced by the (name, tensor) pairs `split(name, tensor)`
    makes of it (None: kept as it is): Qwen3-VL-MoE's fused experts, Qwen3-Next's fused projections."""
    for name, tensor in tensors:
        name = _local_name(name)
        try:
            parts = split(name, tensor)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        yield from parts if parts is not None else [(name, tensor)]


def _split_experts(config: ModelConfig, saved_by_v5: bool):
    return lambda name, tensor: experts.split_fused(name, tensor, config.hidden_size,
                                                    config.moe.expert_intermediate_size, saved_by_v5)


def _split_projections(config: ModelConfig):
    return lambda name, tensor: linear_projections.split_fused(name, tensor, config.linear_attention)


def _local_name(name: str) -> str:
    """Our parameter name for a checkpoint tensor. Vision-language checkpoints come in two spellings: released
    Qwen2-VL / 2.5-VL use `model.layers.*` and `visual.*`; Qwen3-VL and transformers 5 use
    `model.language_model.*` and `model.visual.*`."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from None


def _defaults_from_generation_config(gen: dict) -> SamplingParams:
    if gen.get("do_sample") is False:
        return SamplingParams(temperature=0.0)
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return SamplingParams(**{k: gen[k] for k in keys if gen.get(k) is not None})


def _eos_ids(tokenizer, declared: list) -> list[int]:
    """The model's declared eos ids plus the ChatML end markers, which end every Qwen answer."""
    ids = [int(i) for i in declared if i is not None]
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            ids.append(token_id)
    return list(dict.fromkeys(ids))
