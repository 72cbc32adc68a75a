"""Models already in the Hugging Face cache, found offline by repo id: never a download, never a write.

The cache keeps each repo at `models--<org>--<name>/`: `refs/<branch>` holds a commit hash, and
`snapshots/<commit>/` holds the files, as symlinks into `blobs/` (copies on systems without symlinks).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

DEFAULT_REVISION = "main"
_REPO_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([A-Za-z0-9_.][A-Za-z0-9_./-]*))?")


def hub_cache() -> Path:
    """The cache folder, found the way huggingface_hub finds it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def is_repo_id(text: str) -> bool:
    """`org/name` or `org/name@revision`: the shape of a Hugging Face model id."""
    match = _REPO_ID.fullmatch(text)
    return match is not None and ".." not in text


@dataclass
class CachedModel:
    repo_id: str
    revision: str
    snapshot: Path  # snapshots/<commit>
    model_path: Path  # the snapshot folder, or its one GGUF file when the repo holds GGUF only

    @property
    def commit(self) -> str:
        return self.snapshot.name


def repo_folder(cache: Path, repo_id: str) -> Path | None:
    """`models--org--name` in `cache`; the Hub's ids are case-insensitive, so a differently cased folder counts."""
    exact = cache / ("models--" + repo_id.replace("/", "--"))
    if exact.is_dir():
        return exact
    wanted = exact.name.lower()
    try:
        return next((p for p in cache.iterdir() if p.name.lower() == wanted and p.is_dir()), None)
    except OSError:
        return None


def resolve(text: str) -> CachedModel:
    match = _REPO_ID.fullmatch(text)
    if match is None or ".." in text:
        raise ModelLoadError(f"{text!r} is not a Hugging Face model id (expected org/name or org/name@revision)")
    repo_id = f"{match.group(1)}/{match.group(2)}"
    revision = match.group(3) or DEFAULT_REVISION
    cache = hub_cache()
    folder = repo_folder(cache, repo_id)
    if folder is None:
        raise ModelLoadError(
            f"{repo_id!r} is not a file or folder here, nor in the Hugging Face cache (looked for "
            f"{cache / ('models--' + repo_id.replace('/', '--'))}; set HF_HUB_CACHE or HF_HOME if the cache "
            f"is elsewhere). qwen-engine never downloads: fetch it first, e.g. `hf download {repo_id}`"
        )
    snapshot = find_snapshot(folder, revision, explicit=match.group(3) is not None)
    return CachedModel(repo_id, revision, snapshot, check_snapshot(snapshot))


def find_snapshot(folder: Path, revision: str, explicit: bool = True) -> Path:
    """refs/<revision> → snapshots/<commit>; a commit hash names its snapshot directly."""
    snapshots = folder / "snapshots"
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        path = snapshots / commit
        if not path.is_dir():
            raise ModelLoadError(f"{ref} points at commit {commit}, but {path} is missing (incomplete download)")
        return path
    if (snapshots / revision).is_dir():
        return snapshots / revision
    available = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    # No refs/main happens when files were fetched by commit hash; one snapshot is then unambiguous.
    if not explicit and len(available) == 1:
        return snapshots / available[0]
    refs = sorted(p.name for p in (folder / "refs").iterdir()) if (folder / "refs").is_dir() else []
    raise ModelLoadError(
        f"{folder}: no revision {revision!r} (no {ref}); refs there: {', '.join(refs) or 'none'}; "
        f"snapshots: {', '.join(available) or 'none'} — name one as org/name@<revision>"
    )


def check_snapshot(snapshot: Path) -> Path:
    """The loadable path of a snapshot, or an error saying which file is missing."""
    config = snapshot / "config.json"
    if config.is_file():
        _require_weights(snapshot)
        return snapshot
    # A vision projector (llama.cpp's mmproj file) is not the model: the loader finds it beside the model's file.
    ggufs = sorted(p for p in snapshot.glob("*.gguf") if p.is_file() and not p.name.lower().startswith("mmproj"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"{snapshot} holds several GGUF files ({', '.join(p.name for p in ggufs)}); pass the one you want "
            f"by its path"
        )
    problem = "links to a missing blob" if config.is_symlink() else "is missing"
    raise ModelLoadError(
        f"{config} {problem}, and there is no GGUF file either: the snapshot is not a complete model "
        f"(files: {', '.join(sorted(p.name for p in snapshot.iterdir())) or 'none'})"
    )


def _require_weights(snapshot: Path) -> None:
    from .safetensors import checkpoint_files

    present = [p for p in snapshot.glob("*.safetensors") if p.is_file()]
    index = snapshot / "model.safetensors.index.json"
    if not present and not index.is_file():
        broken = sorted(p.name for p in snapshot.glob("*.safetensors"))
        detail = f" ({', '.join(broken)} link to missing blobs)" if broken else ""
        raise ModelLoadError(
            f"{snapshot}: config.json but no safetensors weights{detail}; the download is incomplete or the "
            f"repo holds another format"
        )
    checkpoint_files(snapshot)  # names any shard the index lists that is missing


def cached_repos(cache: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(repo id, folder) for every model repo in the cache; datasets and spaces are skipped."""
    cache = cache or hub_cache()
    try:
        folders = sorted(cache.iterdir())
    except OSError:
        return
    for folder in folders:
        if folder.name.startswith("models--") and folder.is_dir():
            org, _, name = folder.name.removeprefix("models--").partition("--")
            yield (f"{org}/{name}" if name else org), folder
