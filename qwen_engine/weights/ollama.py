"""Models in ollama's store, read where they lie: no copy, no network, nothing written into the store.

The store (`$OLLAMA_MODELS`, default `~/.ollama/models`) holds one manifest per name and tag at
`manifests/<host>/<namespace>/<model>/<tag>`, and content-addressed blobs at `blobs/sha256-<hex>`. The
manifest's layers are told apart by media type: the GGUF weights, a vision projector, the system message,
sampling parameters (JSON), ollama's Go prompt template, the license.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.sampling_params import SamplingParams
from ..errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MEDIA_PREFIX = "application/vnd.ollama.image."
MODEL, PROJECTOR, ADAPTER = "model", "projector", "adapter"
TEMPLATE, SYSTEM, PARAMS, MESSAGES, LICENSE = "template", "system", "params", "messages", "license"

# Name parts as ollama allows them; a leading letter, digit or underscore also keeps out "." and "..".
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")

# Blobs below this size are hashed on every use; a stamp would cost more than it saves.
_STAMP_THRESHOLD = 1 << 20

# ollama parameter → (SamplingParams field, converter). Values that mean "off" in ollama become None.
_PARAMS = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", lambda v: int(v) if int(v) >= 0 else None),  # ollama: -1 = a random seed
    "num_predict": ("max_tokens", lambda v: int(v) if int(v) > 0 else None),  # -1 unlimited, -2 fill context
    "stop": ("stop", lambda v: [v] if isinstance(v, str) else [str(s) for s in v]),
}


def store_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        """The short form ollama prints: host and namespace only when they are not the defaults."""
        prefix = ""
        if self.host != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    def manifest_path(self, root: Path) -> Path:
        return root / "manifests" / self.host / self.namespace / self.model / self.tag


def parse_name(text: str) -> OllamaName:
    """`[host/][namespace/]model[:tag]`, as ollama accepts it (a host may carry a port)."""
    rest, tag = text, DEFAULT_TAG
    slash, colon = text.rfind("/"), text.rfind(":")
    if colon > slash:
        rest, tag = text[:colon], text[colon + 1 :]
    parts = rest.split("/")
    host, namespace, model = ([DEFAULT_HOST, DEFAULT_NAMESPACE][: max(0, 3 - len(parts))] + parts)[-3:]
    valid = _HOST.fullmatch(host) and all(_PART.fullmatch(p) for p in (namespace, model, tag))
    if len(parts) > 3 or not valid:
        raise ModelLoadError(
            f"{text!r} is not a valid ollama model name; expected ollama:[host/][namespace/]model[:tag], "
            f"e.g. ollama:qwen2.5:0.5b"
        )
    return OllamaName(host, namespace, model, tag)


@dataclass
class Layer:
    media_type: str  # the part after application/vnd.ollama.image., or the full type if foreign
    digest: str
    size: int | None
    path: Path


@dataclass
class Manifest:
    path: Path
    config: Layer | None
    layers: list[Layer]

    def find(self, kind: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.media_type == kind), None)


def blob_path(root: Path, digest: Any, where: Path) -> Path:
    """`sha256:<hex>` → `blobs/sha256-<hex>`; any other shape (e.g. `../`) is refused, never joined."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise ModelLoadError(f"{where}: invalid blob digest {digest!r} (expected sha256:<64 hex digits>)")
    return root / "blobs" / f"sha256-{m.group(1)}"


def read_manifest(path: Path, root: Path) -> Manifest:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ollama manifest ({e.strerror})") from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: ollama manifest is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise ModelLoadError(f"{path}: not an ollama manifest (no \"layers\" list)")

    def layer(entry: Any) -> Layer:
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{path}: manifest layer {entry!r} is not an object")
        media = str(entry.get("mediaType", ""))
        size = entry.get("size")
        return Layer(
            media.removeprefix(MEDIA_PREFIX),
            entry.get("digest"),
            size if isinstance(size, int) else None,
            blob_path(root, entry.get("digest"), path),
        )

    config = layer(data["config"]) if isinstance(data.get("config"), dict) else None
    return Manifest(path, config, [layer(e) for e in data["layers"]])


def find_manifest(name: OllamaName, root: Path) -> Path:
    """The manifest's path, or an error saying what the store holds instead."""
    path = name.manifest_path(root)
    # ollama treats names case-insensitively; try the spelling given, then the lower-case one.
    lower = OllamaName(*(part.lower() for part in (name.host, name.namespace, name.model, name.tag)))
    for candidate in (path, lower.manifest_path(root)):
        if candidate.is_file():
            return candidate
    model_dir = path.parent
    if model_dir.is_dir():
        tags = sorted(p.name for p in model_dir.iterdir() if p.is_file())
        raise ModelLoadError(
            f"ollama model {name.model!r} has no tag {name.tag!r} (no manifest {path}); "
            f"tags there: {', '.join(tags) or 'none'}"
        )
    raise ModelLoadError(
        f"ollama model {str(name)!r} not found: no manifest {path} (store: {root}; set OLLAMA_MODELS if "
        f"ollama keeps its models elsewhere)"
    )


@dataclass
class OllamaModel:
    """A resolved ollama model: its GGUF blob and what the other layers say."""

    name: OllamaName
    manifest: Manifest
    gguf: Path
    system: str | None = None
    template: str | None = None  # ollama's Go template: for display only, prompts use the GGUF's Jinja one
    license: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the params layer as written
    defaults: SamplingParams = field(default_factory=SamplingParams)
    num_ctx: int | None = None
    projector: Path | None = None  # the vision projector layer (an mmproj GGUF), for weights/mmproj.py


def resolve(text: str, progress: bool = True) -> OllamaModel:
    """`qwen2.5:0.5b` → the verified GGUF blob plus the model's system message and sampling defaults."""
    name, root = parse_name(text), store_root()
    manifest = read_manifest(find_manifest(name, root), root)
    if manifest.find(ADAPTER) is not None:
        raise ModelLoadError(
            f"ollama model {str(name)!r} has a LoRA adapter layer ({manifest.path}), which this version does not "
            f"run yet"
        )
    model = manifest.find(MODEL)
    if model is None:
        raise ModelLoadError(f"{manifest.path}: the manifest has no {MEDIA_PREFIX}{MODEL} layer")
    for layer in manifest.layers:
        if layer.media_type in (MODEL, PROJECTOR, SYSTEM, TEMPLATE, PARAMS, LICENSE):
            verify_blob(layer, manifest.path, progress, f"verifying ollama:{name}")
    result = OllamaModel(name, manifest, model.path)
    if (layer := manifest.find(PROJECTOR)) is not None:
        result.projector = layer.path
    if (layer := manifest.find(SYSTEM)) is not None:
        result.system = _text(layer)
    if (layer := manifest.find(TEMPLATE)) is not None:
        result.template = _text(layer)
    if (layer := manifest.find(LICENSE)) is not None:
        result.license = _text(layer)
    if manifest.find(MESSAGES) is not None:
        log.warning("ollama:%s: the messages layer (a preset conversation) is ignored by qwen-engine", name)
    if (layer := manifest.find(PARAMS)) is not None:
        result.params = _params_json(layer)
        result.defaults, result.num_ctx = map_params(result.params, f"ollama:{name}")
    return result


def map_params(params: dict[str, Any], label: str) -> tuple[SamplingParams, int | None]:
    """ollama's parameters → (sampling defaults, num_ctx). Keys without an equivalent, and values our
    validation refuses, are named in one warning each and otherwise ignored."""
    values: dict[str, Any] = {}
    ignored, invalid = [], []
    for key, value in params.items():
        if key == "num_ctx":
            continue
        if key not in _PARAMS:
            ignored.append(key)
            continue
        target, convert = _PARAMS[key]
        try:
            converted = convert(value)
            if converted is not None:
                SamplingParams(**{target: converted})  # validate this one value on its own
            values[target] = converted
        except (TypeError, ValueError, InputError):
            invalid.append(f"{key}={value!r}")
    num_ctx = params.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        invalid.append(f"num_ctx={num_ctx!r}")
        num_ctx = None
    if ignored:
        log.warning("%s: ollama parameters qwen-engine has no equivalent for (ignored): %s", label,
                    ", ".join(sorted(ignored)))
    if invalid:
        log.warning("%s: ollama parameter values out of range (ignored): %s", label, ", ".join(invalid))
    return SamplingParams(**values), num_ctx


def verify_blob(layer: Layer, manifest: Path, progress: bool = True, desc: str = "verifying") -> None:
    """Check that a blob exists, has the manifest's size and hashes to its digest.

    Large blobs are hashed once; a stamp in qwen-engine's own cache (digest, size, mtime) spares the next
    start the minute a multi-gigabyte hash would cost. Nothing is written into the store.
    """
    path, expected = layer.path, layer.digest.removeprefix("sha256:")
    try:
        st = path.stat()
    except OSError:
        raise ModelLoadError(
            f"{manifest} names blob {layer.digest} ({layer.media_type}), but {path} is missing"
        ) from None
    if layer.size is not None and st.st_size != layer.size:
        raise ModelLoadError(
            f"{path}: blob is {st.st_size} bytes, but the manifest {manifest} says {layer.size}; it is "
            f"damaged or incomplete (re-pull the model with ollama)"
        )
    stamp = _stamp_path(expected)
    key = {"digest": layer.digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size >= _STAMP_THRESHOLD and _read_json_quietly(stamp) == key:
        return
    actual = _sha256(path, st.st_size, progress and st.st_size >= _STAMP_THRESHOLD, desc)
    if actual != expected:
        raise ModelLoadError(
            f"{path}: sha256 is {actual}, but the manifest {manifest} says {expected}; the blob is damaged "
            f"(re-pull the model with ollama)"
        )
    if st.st_size >= _STAMP_THRESHOLD:
        _write_stamp(stamp, key)


def _sha256(path: Path, size: int, progress: bool, desc: str) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read blob ({e.strerror})") from None
    return digest.hexdigest()


def _stamp_path(hex_digest: str) -> Path:
    from .demo import cache_home

    return cache_home() / "verified" / "ollama" / f"sha256-{hex_digest}.json"


def _read_json_quietly(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(stamp: Path, key: dict) -> None:
    # A cache, not a record: if it cannot be written, the next start simply hashes again.
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(json.dumps(key))
        os.replace(tmp, stamp)
    except OSError:
        pass


def _text(layer: Layer) -> str:
    try:
        return layer.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{layer.path}: cannot read the {layer.media_type} layer ({e})") from None


def _params_json(layer: Layer) -> dict[str, Any]:
    try:
        data = json.loads(layer.path.read_bytes())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{layer.path}: the params layer is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{layer.path}: the params layer is not a JSON object")
    return data
