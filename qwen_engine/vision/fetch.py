"""Turn whatever a user gave as an image into an upright RGB PIL image.

Accepted sources: a PIL image, raw bytes, a local path (str or PathLike), a ``file://`` URL, an
``http(s)://`` URL and a ``data:image/...;base64,`` URL. Every failure is an InputError that names the
source and the reason.

RGB rule. Images with transparency (an "A" band as in RGBA/LA/PA, or a ``transparency`` entry as in
palette or tRNS images) are composited onto opaque white; everything else goes through
``Image.convert("RGB")`` (grayscale, palette, CMYK, bilevel, ...). This is the rule of transformers'
image processors (``image_transforms.convert_to_rgb``), which are the parity reference: converting here
with the same rule makes ``preprocess_image(load_image(x))`` equal to the processor fed the raw image.
qwen-vl-utils' ``to_rgb`` composites only mode RGBA (with the same result, checked bit for bit) and
drops the alpha of LA/PA/palette-with-transparency images, so its output differs from transformers'
there; transformers' rule is the one that keeps transparent areas white in every mode.
(``transformers.image_utils.load_image`` itself drops alpha; its processors do not.)

EXIF orientation is applied (``ImageOps.exif_transpose``), as transformers' ``load_image`` does, so
photos from phones come out upright.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 20 << 20
_USER_AGENT = "qwen-engine"


def load_image(
    source: ImageSource, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES
) -> Image.Image:
    """Load `source` as an upright RGB image. `timeout` (seconds) and `max_bytes` bound http(s) downloads;
    `max_bytes` also bounds the decoded payload of a data URL. Raises InputError with the reason."""
    if isinstance(source, Image.Image):
        image, what = source, "the image"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image, what = _decode(bytes(source), "the image bytes"), "the image bytes"
    elif isinstance(source, os.PathLike):
        what = f"the file {str(source)!r}"
        image = _decode(_read_file(Path(source)), what)
    elif isinstance(source, str):
        data, what = _read_str(source, timeout, max_bytes)
        image = _decode(data, what)
    else:
        raise InputError(
            f"unsupported image input of type {type(source).__name__}: pass a PIL image, bytes, a path, "
            "or a file://, http(s):// or data:image/...;base64, URL"
        )
    try:
        image.load()  # a lazily opened PIL image may still be truncated; fail here, not halfway through
    except Exception as exc:
        raise InputError(f"could not decode {what}: {exc}") from exc
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"{what} has a side of 0 pixels ({width}x{height})")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block should not reject an otherwise good image
        pass
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB by transformers' processor rule: transparency is composited on white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _describe(source: str) -> str:
    # data URLs can be megabytes long; never put the payload into an error message
    if source.startswith("data:"):
        return f"the data URL {source[:40]}..." if len(source) > 40 else f"the data URL {source}"
    return source


def _decode(data: bytes, what: str) -> Image.Image:
    if not data:
        raise InputError(f"{what} is empty, not an image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as exc:
        raise InputError(f"{what} is not an image, or is in a format Pillow cannot read") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} is too large to decode safely: {exc}") from exc
    except Exception as exc:  # truncated or corrupt data, or a codec Pillow lacks
        raise InputError(f"could not decode {what}: {exc}") from exc
    return image


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise InputError(f"image path {str(path)!r} is a directory, not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"could not read image file {str(path)!r}: {exc.strerror or exc}") from exc


def _read_str(source: str, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    """The bytes `source` names, and how to name it in an error message."""
    lowered = source[:16].lower()
    if lowered.startswith("data:"):
        return _read_data_url(source, max_bytes), _describe(source)
    if lowered.startswith(("http://", "https://")):
        return _read_http(source, timeout, max_bytes)
    if lowered.startswith("file://"):
        return _read_file(_file_url_path(source)), f"the file {source!r}"
    scheme = urllib.parse.urlsplit(source).scheme
    if "://" in source and len(scheme) > 1:  # one letter would be a Windows drive, not a scheme
        raise InputError(
            f"unsupported URL scheme {scheme!r} in {source!r}: use a path, or a file://, http(s):// or "
            "data:image/...;base64, URL"
        )
    return _read_file(Path(source).expanduser()), f"the file {source!r}"


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"file URL {url!r} names a remote host {parts.netloc!r}; only local files are read")
    return Path(urllib.request.url2pathname(parts.path))


def _read_data_url(url: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise InputError(f"{_describe(url)} has no ',' separating the header from the data")
    params = head[len("data:") :].split(";")
    mime = params[0].strip().lower()
    if not mime.startswith("image/"):
        raise InputError(f"{_describe(url)} has media type {mime or 'none'!r}; expected image/...")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InputError(f"{_describe(url)} is not base64-encoded; only data:image/...;base64, URLs are read")
    payload = "".join(urllib.parse.unquote(payload).split())  # clients may wrap lines or %-escape
    too_big = InputError(f"{_describe(url)} holds more than the {max_bytes}-byte limit")
    if len(payload) // 4 * 3 > max_bytes + 3:  # surely too big: refuse before decoding
        raise too_big
    try:
        # tolerate missing '=' padding (common in hand-built URLs), nothing else
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{_describe(url)} is not valid base64: {exc}") from exc
    if len(data) > max_bytes:
        raise too_big
    return data


def _read_http(url: str, timeout: float, max_bytes: int, kind: str = "image") -> tuple[bytes, str]:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept": f"{kind}/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise InputError(
                    f"could not fetch {kind} {url}: the body is {int(length)} bytes, over the {max_bytes}-byte limit"
                )
            data = response.read(max_bytes + 1)  # one byte more tells an over-long body without a length
            if len(data) > max_bytes:
                raise InputError(f"could not fetch {kind} {url}: the body is over the {max_bytes}-byte limit")
            content_type = response.headers.get("Content-Type", "")
    except InputError:
        raise  # InputError is a ValueError: keep it out of the catch-all below
    except urllib.error.HTTPError as exc:
        raise InputError(f"could not fetch {kind} {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            reason = f"timed out after {timeout:g} s"
        raise InputError(f"could not fetch {kind} {url}: {reason}") from exc
    except TimeoutError as exc:
        raise InputError(f"could not fetch {kind} {url}: timed out after {timeout:g} s") from exc
    except (OSError, ValueError) as exc:  # connection reset mid-body, malformed URL, bad status line
        raise InputError(f"could not fetch {kind} {url}: {exc}") from exc
    if not data:
        raise InputError(f"could not fetch {kind} {url}: the body is empty")
    # The server's Content-Type goes into a decode error: "text/html" explains most failures at once.
    kind = f" (Content-Type {content_type!r})" if content_type else ""
    return data, f"the body of {url}{kind}"
