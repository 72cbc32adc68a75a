"""Every model qwen-engine can find, for `qwen-engine models`: the demo model, ollama's store, the HF cache.

Listing reads manifests, config files and GGUF headers only: no tensor, no digest check, no write.
A model that cannot be listed properly is still listed, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import (
    GGUF_ARCHITECTURES,
    GGUF_VL_ARCHITECTURES,
    HF_ARCHITECTURES,
    HF_VL_ARCHITECTURES,
    VL_MODEL_TYPES,
)
from ..errors import ModelLoadError


@dataclass
class CatalogEntry:
    name: str  # what to pass to --model / LLM(model=…)
    source: str  # "demo", "ollama" or "hf"
    family: str | None = None  # the architecture, e.g. qwen2
    params: str | None = None  # parameter count, e.g. "0.5B"
    quant: str | None = None  # e.g. Q4_K_M, bfloat16
    size: int | None = None  # bytes on disk
    runs: str = "unsupported"  # "text", "vision" or "unsupported"
    note: str = ""  # why not, or what to do first
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_models() -> list[CatalogEntry]:
    return [demo_entry(), *ollama_entries(), *hf_entries()]


def searched() -> list[str]:
    """Where the listing looked, for the line under the table."""
    from .demo import cache_home
    from .hf_cache import hub_cache
    from .ollama import store_root

    return [
        f"demo model: {cache_home() / 'models'}  (QWEN_ENGINE_HOME)",
        f"ollama store: {store_root()}  (OLLAMA_MODELS)",
        f"Hugging Face cache: {hub_cache()}  (HF_HUB_CACHE, HF_HOME)",
    ]


# -- the demo model --------------------------------------------------------------------------------------


def demo_entry() -> CatalogEntry:
    from ..errors import DemoModelError
    from .demo import DEMO_NAME, DEMO_SIZE, INSTALL_HINT, cache_home, find_parts

    target = cache_home() / "models" / DEMO_NAME
    entry = CatalogEntry("(default: no --model)", "demo", "qwen2", "0.5B", "Q4_K_M", DEMO_SIZE, "text",
                         path=str(target))
    if not target.is_file():
        try:
            find_parts()
            entry.note = "not assembled yet; `qwen-engine pull-demo` or the first run does it"
        except DemoModelError:
            entry.runs, entry.note = "unsupported", f"not installed: {INSTALL_HINT}"
    return entry


# -- ollama ----------------------------------------------------------------------------------------------


def ollama_entries() -> list[CatalogEntry]:
    from .ollama import OllamaName, store_root

    root = store_root()
    manifests = root / "manifests"
    entries = []
    for path in sorted(manifests.glob("*/*/*/*")):
        if path.is_file():
            name = OllamaName(*path.relative_to(manifests).parts)
            entries.append(_ollama_entry(f"ollama:{name}", path, root))
    return entries


def _ollama_entry(name: str, manifest_path: Path, root: Path) -> CatalogEntry:
    from . import ollama

    entry = CatalogEntry(name, "ollama", path=str(manifest_path))
    try:
        manifest = ollama.read_manifest(manifest_path, root)
    except ModelLoadError as e:
        entry.note = str(e).replace(f"{manifest_path}: ", "")
        return entry
    config = _json_or_empty(manifest.config.path) if manifest.config else {}
    entry.family, entry.params, entry.quant = config.get("model_family"), config.get("model_type"), config.get("file_type")
    model = manifest.find(ollama.MODEL)
    if model is None:
        entry.note = "the manifest has no model layer"
        return entry
    entry.path = str(model.path)
    entry.size = sum(layer.size or 0 for layer in manifest.layers)
    if not model.path.is_file():
        entry.note = f"model blob {model.path.name} is missing"
        return entry
    arch = _describe_gguf(entry, model.path)
    if manifest.find(ollama.ADAPTER) is not None:
        entry.runs, entry.note = "unsupported", "has a LoRA adapter layer, which is not supported"
    elif manifest.find(ollama.PROJECTOR) is not None and arch in GGUF_VL_ARCHITECTURES:
        entry.runs = "vision"  # its projector layer is llama.cpp's mmproj file (weights/mmproj.py)
    return entry


# -- the Hugging Face cache ------------------------------------------------------------------------------


def hf_entries() -> list[CatalogEntry]:
    from .hf_cache import cached_repos

    return [_hf_entry(repo_id, folder) for repo_id, folder in cached_repos()]


def _hf_entry(repo_id: str, folder: Path) -> CatalogEntry:
    from .hf_cache import check_snapshot, find_snapshot
    from .safetensors import checkpoint_files, count_parameters

    entry = CatalogEntry(repo_id, "hf", path=str(folder))
    try:
        snapshot = find_snapshot(folder, "main", explicit=False)
        entry.path = str(snapshot)
        model_path = check_snapshot(snapshot)
    except ModelLoadError as e:
        entry.note = _short(str(e).replace(f"{entry.path}/", "").replace(f"{folder}/", ""))
        return entry
    if model_path.is_file():  # a GGUF-only repo
        entry.size = model_path.stat().st_size
        arch = _describe_gguf(entry, model_path)
        projectors = [p for p in snapshot.glob("*.gguf") if p.name.lower().startswith("mmproj")]
        if arch in GGUF_VL_ARCHITECTURES and len(projectors) == 1:  # the loader takes a lone projector beside it
            entry.runs = "vision"
            entry.size += projectors[0].stat().st_size
        return entry
    config = _json_or_empty(snapshot / "config.json")
    files = checkpoint_files(snapshot)
    entry.size = sum(f.stat().st_size for f in files)
    entry.family = config.get("model_type")
    quant = config.get("quantization_config") or {}
    entry.quant = quant.get("quant_method") if isinstance(quant, dict) and quant else (
        config.get("dtype") or config.get("torch_dtype"))
    try:
        entry.params = _format_count(count_parameters(files))
    except ModelLoadError:
        pass
    archs = config.get("architectures") or []
    if quant:
        entry.note = f"{entry.quant}-quantised checkpoint: not supported (use a GGUF or an unquantised one)"
    elif any(a in HF_ARCHITECTURES for a in archs):
        entry.runs = "text"
    elif any(a in HF_VL_ARCHITECTURES for a in archs) or config.get("model_type") in VL_MODEL_TYPES:
        entry.runs = "vision"
    elif "vision_config" in config or any("VL" in a or "Vision" in a for a in archs):
        entry.note = f"vision-language model ({', '.join(archs)}): not supported yet"
    else:
        entry.note = f"architecture {', '.join(archs) or entry.family or 'unknown'}: not supported"
    return entry


# -- shared ----------------------------------------------------------------------------------------------


def _describe_gguf(entry: CatalogEntry, path: Path) -> str | None:
    """Fill the entry from the file's header; return its architecture (None if unreadable)."""
    from .gguf import read_summary

    try:
        summary = read_summary(path)
    except ModelLoadError as e:
        entry.runs, entry.note = "unsupported", _short(str(e).replace(f"{path}: ", ""))
        return None
    arch = summary.architecture
    entry.family = entry.family or arch
    entry.params = entry.params or summary.metadata.get("general.size_label") or _format_count(summary.n_params)
    entry.quant = entry.quant or summary.file_type
    if arch in GGUF_ARCHITECTURES:
        # ollama's published vision models hold their tower in the same file
        entry.runs = "vision" if f"{arch}.vision.block_count" in summary.metadata else "text"
    elif "vl" in arch.lower():
        entry.runs, entry.note = "unsupported", f"vision-language GGUF ({arch}): not supported yet"
    else:
        entry.runs, entry.note = "unsupported", f"GGUF architecture {arch}: not supported"
    return arch


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _short(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _format_count(n: int) -> str | None:
    if n <= 0:
        return None
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_table(entries: list[CatalogEntry]) -> str:
    """An aligned text table, one model per line."""
    header = ("NAME", "SOURCE", "FAMILY", "PARAMS", "QUANT", "SIZE", "RUNS")
    rows = [header]
    for e in entries:
        runs = e.runs if not e.note else f"{e.runs}: {e.note}" if e.runs == "unsupported" else f"{e.runs} ({e.note})"
        rows.append((e.name, e.source, e.family or "-", e.params or "-", e.quant or "-", format_size(e.size), runs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows
    )
