"""From what the user typed to a model on disk: a path, the demo model, an ollama name or a Hugging Face id.

    None                          the bundled demo model
    path/to/model.gguf, folder/   that file or folder (an existing path always wins over the name forms)
    ollama:qwen2.5:0.5b           a model in ollama's store, with its system message and parameters
    Qwen/Qwen2.5-0.5B-Instruct    a snapshot in the Hugging Face cache (optionally @revision)

Resolution only finds and checks files; loading them is weights/loader.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..engine.sampling_params import SamplingParams
from ..errors import ModelLoadError

OLLAMA_PREFIX = "ollama:"
ACCEPTED = (
    "a GGUF file, a Hugging Face model folder, ollama:NAME[:TAG] (a model in ollama's store) or a Hugging "
    "Face id ORG/NAME[@REVISION] (a model in the Hugging Face cache); see docs/models.md"
)


@dataclass
class ModelSource:
    kind: str  # "demo", "path", "ollama" or "hf"
    name: str  # how to show the model to a person
    path: Path  # a GGUF file or a Hugging Face folder
    defaults: SamplingParams = field(default_factory=SamplingParams)  # laid over the model's own defaults
    system_prompt: str | None = None  # used when a conversation brings no system message
    max_model_len: int | None = None  # the default context length (capped by the model's)
    template: str | None = None  # ollama's Go template, kept for display: prompts use the GGUF's Jinja one
    mmproj: Path | None = None  # a GGUF's vision projector (ollama's projector layer)


def resolve_source(model: str | Path | None, progress: bool = True) -> ModelSource:
    """Find the model `model` names, without loading it. Raises ModelLoadError naming what was tried."""
    if model is None:
        from .demo import demo_model_path

        return ModelSource("demo", "the demo model", demo_model_path(progress=progress))
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return ModelSource("path", text, path)
    if text.startswith(OLLAMA_PREFIX) and not isinstance(model, Path):
        return _ollama(text.removeprefix(OLLAMA_PREFIX), progress)
    if isinstance(model, Path) or _looks_like_path(text):
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    from . import hf_cache

    if hf_cache.is_repo_id(text):
        cached = hf_cache.resolve(text)
        name = cached.repo_id + (f"@{cached.revision}" if cached.revision != hf_cache.DEFAULT_REVISION else "")
        return ModelSource("hf", name, cached.model_path)
    raise ModelLoadError(f"{text!r} is neither an existing file or folder nor a model name; pass {ACCEPTED}")


def merge_defaults(over: SamplingParams, under: SamplingParams) -> SamplingParams:
    """`under` with every field `over` sets (not None) replaced: a source's defaults beat the model's."""
    changes = {
        f.name: getattr(over, f.name)
        for f in fields(over)
        if f.default is None and getattr(over, f.name) is not None
    }
    return replace(under, **changes)


def _ollama(name: str, progress: bool) -> ModelSource:
    from . import ollama

    found = ollama.resolve(name, progress)
    return ModelSource(
        "ollama",
        f"{OLLAMA_PREFIX}{found.name}",
        found.gguf,
        defaults=found.defaults,
        system_prompt=found.system,
        max_model_len=found.num_ctx,
        template=found.template,
        mmproj=found.projector,
    )


def _looks_like_path(text: str) -> bool:
    # Names never start like a path or end like a weights file; such text is a path the user mistyped.
    return text.startswith(("/", ".", "~", "\\")) or text.lower().endswith((".gguf", ".safetensors", ".json"))
