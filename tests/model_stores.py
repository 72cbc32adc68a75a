"""Build an ollama store and a Hugging Face cache on disk, laid out the way ollama and huggingface_hub do it.

ollama: blobs are content-addressed (`blobs/sha256-<hex of the content>`), the manifest is the compact JSON
ollama writes, at `manifests/<host>/<namespace>/<model>/<tag>`, and its config layer is a JSON blob too.
Hugging Face: `models--org--name/refs/main` holds the commit, `snapshots/<commit>/<file>` are relative
symlinks into `blobs/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MEDIA = "application/vnd.ollama.image."
_HASHES: dict[tuple[str, int, int], str] = {}  # the demo GGUF is hashed once per run, not once per store


def known_digest(path: Path, hex_digest: str) -> None:
    """Record a digest already verified elsewhere (the demo GGUF's), so building a store does not re-hash it."""
    st = path.stat()
    _HASHES[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = hex_digest


def sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def add_blob(root: Path, content: bytes | Path) -> dict:
    """Store `content` as ollama does; a file is hard-linked (or copied) rather than read into memory."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        hex_digest, size = sha256_file(content), content.stat().st_size
        target = blobs / f"sha256-{hex_digest}"
        if not target.exists():
            try:
                os.link(content, target)
            except OSError:
                shutil.copyfile(content, target)
    else:
        hex_digest, size = hashlib.sha256(content).hexdigest(), len(content)
        (blobs / f"sha256-{hex_digest}").write_bytes(content)
    return {"digest": f"sha256:{hex_digest}", "size": size}


def make_ollama_model(
    root: Path,
    model: str,
    tag: str = "latest",
    *,
    gguf: Path | bytes,
    family: str = "qwen2",
    model_type: str = "494.03M",
    file_type: str = "Q4_K_M",
    system: str | None = None,
    params: dict | None = None,
    template: str | None = None,
    license: str | None = None,
    projector: bytes | Path | None = None,
    messages: list | None = None,
    namespace: str = "library",
    host: str = "registry.ollama.ai",
) -> Path:
    """Write the blobs and the manifest of one model; return the manifest's path."""
    layers = [{"mediaType": MEDIA + "model", **add_blob(root, gguf)}]
    if projector is not None:
        layers.append({"mediaType": MEDIA + "projector", **add_blob(root, projector)})
    texts = {"template": template, "system": system, "license": license}
    for kind, text in texts.items():
        if text is not None:
            layers.append({"mediaType": MEDIA + kind, **add_blob(root, text.encode())})
    if params is not None:
        layers.append({"mediaType": MEDIA + "params", **add_blob(root, json.dumps(params).encode())})
    if messages is not None:
        layers.append({"mediaType": MEDIA + "messages", **add_blob(root, json.dumps(messages).encode())})
    config = {
        "model_format": "gguf", "model_family": family, "model_families": [family], "model_type": model_type,
        "file_type": file_type, "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   **add_blob(root, json.dumps(config, separators=(",", ":")).encode())},
        "layers": layers,
    }
    path = root / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, separators=(",", ":")))
    return path


def make_hf_repo(cache: Path, repo_id: str, files: Path, commit: str | None = None, ref: str | None = "main") -> Path:
    """Put the files of folder `files` into the cache as snapshot `commit`; return the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for src in sorted(files.iterdir()):
        if src.is_file():
            etag = sha256_file(src)
            blob = repo / "blobs" / etag
            if not blob.exists():
                shutil.copyfile(src, blob)
            (snapshot / src.name).symlink_to(Path("..", "..", "blobs", etag))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def write_llama_gguf(path: Path, arch: str = "llama") -> Path:
    """A tiny GGUF of an architecture qwen-engine does not run."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    """path → (size, mtime_ns) of everything under `roots`, links not followed: to prove nothing changed."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                state[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
        state[str(root)] = (0, os.lstat(root).st_mtime_ns)
    return state
