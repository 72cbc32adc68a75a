"""Image input and preprocessing for the Qwen VL families, against transformers' PIL image processor.

The reference is transformers 5.23 `Qwen2VLImageProcessorPil` (what AutoImageProcessor gives with
backend="pil" for qwen2_vl, qwen2_5_vl and qwen3_vl), loaded from the same preprocessor_config.json our
ImageProcessorConfig.from_dir reads. Our pipeline does the reference's IEEE operations in the same order
(PIL BICUBIC on uint8, float64 rescale rounded to float32, float32 normalise), so pixel_values are
compared for exact equality: a tolerance such as 1e-5 would hide real mistakes (normalising in float64, or
resizing in float, are off by ~1e-7 and by grey levels respectively). Grids and token counts are integers
and must match exactly.

Images are generated: hard-edged colour blocks plus noise, so bicubic overshoot and clamping matter.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as hf_load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwen_engine.errors import InputError, ModelLoadError
from qwen_engine.vision import ImageProcessorConfig, load_image, preprocess_image, smart_resize

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# preprocessor_config.json per family: Qwen2-VL with nothing but the type (transformers' class defaults),
# Qwen2.5-VL and Qwen3-VL as their released checkpoints ship them.
CONFIGS = {
    "qwen2_vl": {"image_processor_type": "Qwen2VLImageProcessor"},
    "qwen2_5_vl": {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    },
    "qwen3_vl": {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
}
FAMILIES = list(CONFIGS)


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """family -> (our config, transformers' PIL processor), both read from the same folder."""
    from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil

    result = {}
    for family, config in CONFIGS.items():
        folder = tmp_path_factory.mktemp(family)
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = AutoImageProcessor.from_pretrained(folder, backend="pil")
        assert type(reference) is Qwen2VLImageProcessorPil  # the bit-exact backend (oracle.md section 5)
        result[family] = (ImageProcessorConfig.from_dir(folder, family), reference)
    return result


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (h, w, 3): random colour blocks with hard edges, a gradient and noise."""
    rng = np.random.default_rng(seed)
    block = max(1, min(height, width) // 3)
    colours = rng.integers(0, 256, ((height + block - 1) // block, (width + block - 1) // block, 3))
    image = np.repeat(np.repeat(colours, block, 0), block, 1)[:height, :width].astype(np.int32)
    image += (np.arange(width)[None, :, None] * 64 // max(width, 1)).astype(np.int32)
    image += rng.integers(-20, 21, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _rgba(h, w):
    alpha = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)
    alpha[: h // 3] = 0  # a fully transparent band
    return Image.fromarray(np.concatenate([picture(h, w, 1), alpha], -1), "RGBA")


def _la(h, w):
    gray = picture(h, w, 2)[..., 0]
    alpha = np.random.default_rng(3).integers(0, 256, (h, w), dtype=np.uint8)
    return Image.fromarray(np.stack([gray, alpha], -1), "LA")


def _palette_transparent(h, w):
    image = Image.fromarray(picture(h, w, 4)).quantize(16)
    image.info["transparency"] = 3  # palette index 3 is see-through, as a GIF or PNG tRNS says
    return image


def _rgb_trns(h, w):
    pixels = picture(h, w, 5)
    image = Image.fromarray(pixels)
    image.info["transparency"] = tuple(int(v) for v in pixels[0, 0])  # PNG tRNS colour key
    return image


def _cmyk(h, w):
    data = np.random.default_rng(6).integers(0, 256, (h, w, 4), dtype=np.uint8).tobytes()
    return Image.frombytes("CMYK", (w, h), data)


# name -> PIL image; shapes are (height, width)
CASES = {
    "tiny_5x7_below_min": lambda: Image.fromarray(picture(5, 7)),
    "strip_1x200_ratio_200": lambda: Image.fromarray(picture(1, 200)),
    "strip_2x399": lambda: Image.fromarray(picture(2, 399)),
    "strip_600x3_tall_ratio_200": lambda: Image.fromarray(picture(600, 3)),
    "very_tall_2000x40": lambda: Image.fromarray(picture(2000, 40)),
    "very_wide_45x3000": lambda: Image.fromarray(picture(45, 3000)),
    "odd_217x333": lambda: Image.fromarray(picture(217, 333)),
    "odd_999x101": lambda: Image.fromarray(picture(999, 101)),
    "large_1700x2100_above_qwen2_max": lambda: Image.fromarray(picture(1700, 2100)),
    "rgba_150x201": lambda: _rgba(150, 201),
    "la_97x131": lambda: _la(97, 131),
    "palette_transparency_120x90": lambda: _palette_transparent(120, 90),
    "palette_77x250": lambda: Image.fromarray(picture(77, 250, 7)).quantize(64),
    "grayscale_130x170": lambda: Image.fromarray(picture(130, 170, 8)[..., 1]),
    "bilevel_64x100": lambda: Image.fromarray(picture(64, 100, 9)[..., 2] > 128),
    "cmyk_111x222": lambda: _cmyk(111, 222),
    "rgb_with_trns_60x80": lambda: _rgb_trns(60, 80),
}


def reference(processor, image, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(image, **kwargs)


def assert_same(ours, ref, processor) -> None:
    grid = tuple(int(v) for v in ref["image_grid_thw"][0])
    assert ours.grid_thw == grid
    _, gh, gw = grid
    assert ours.resized_size == (gh * processor.patch_size, gw * processor.patch_size)
    expected_tokens = gh * gw // processor.merge_size**2
    assert ours.num_tokens == expected_tokens == ref["pixel_values"].shape[0] // processor.merge_size**2
    values = ours.pixel_values.numpy()
    assert values.dtype == np.float32 and ref["pixel_values"].dtype == np.float32
    assert values.shape == ref["pixel_values"].shape
    assert np.array_equal(values, ref["pixel_values"]), np.abs(values - ref["pixel_values"]).max()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers(processors, family, case):
    config, processor = processors[family]
    image = CASES[case]()
    ref = reference(processor, image)
    ours = preprocess_image(image, config)
    assert ours.original_size == (image.height, image.width)
    assert_same(ours, ref, processor)
    # load_image's RGB conversion is the processor's own rule, so going through it changes nothing
    assert_same(preprocess_image(load_image(image), config), ref, processor)


def test_config_from_dir_matches_the_released_values(processors, tmp_path):
    qwen3, _ = processors["qwen3_vl"]
    assert (qwen3.patch_size, qwen3.factor, qwen3.min_pixels, qwen3.max_pixels) == (16, 32, 65536, 16777216)
    assert qwen3.image_mean == qwen3.image_std == (0.5, 0.5, 0.5)
    qwen25, _ = processors["qwen2_5_vl"]
    assert (qwen25.factor, qwen25.min_pixels, qwen25.max_pixels) == (28, 3136, 12845056)
    assert ImageProcessorConfig.for_family("qwen3_vl") == qwen3
    assert ImageProcessorConfig.for_family("qwen2_vl") == processors["qwen2_vl"][0]
    assert ImageProcessorConfig.from_dir(tmp_path, "qwen2_5_vl") == ImageProcessorConfig.for_family(
        "qwen2_5_vl"
    )
    # transformers 5 save_pretrained writes processor_config.json with the image part nested
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": CONFIGS["qwen3_vl"]}))
    assert ImageProcessorConfig.from_dir(tmp_path, "qwen3_vl") == qwen3
    # top-level min/max_pixels win over size, as in transformers
    both = {"size": {"shortest_edge": 1000, "longest_edge": 2000}, "min_pixels": 3136, "max_pixels": 50000}
    config = ImageProcessorConfig.from_dict(both, "qwen2_vl")
    assert (config.min_pixels, config.max_pixels) == (3136, 50000)


def test_exif_rotated_jpeg(processors, tmp_path):
    stored = Image.fromarray(picture(90, 160, 11))  # stored landscape, EXIF says rotate 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo rotated.jpg"
    stored.save(path, quality=90, exif=exif)

    upright = load_image(path)
    assert upright.size == (90, 160)  # (width, height): portrait once the orientation is applied
    for family in FAMILIES:
        config, processor = processors[family]
        ref = reference(processor, hf_load_image(str(path)))
        for source in (path, str(path), path.as_uri(), path.read_bytes()):
            ours = preprocess_image(source, config)
            assert ours.original_size == (160, 90)
            assert_same(ours, ref, processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_item_pixel_budget(processors, family):
    """min_pixels / max_pixels for one image = transformers' per-call size={shortest_edge, longest_edge}."""
    config, processor = processors[family]
    image = Image.fromarray(picture(700, 950, 12))
    f = config.factor
    for low, high in ((config.min_pixels, f * f * 64), (f * f * 2000, f * f * 4000), (f * f, f * f * 8)):
        ours = preprocess_image(image, config, min_pixels=low, max_pixels=high)
        ref = reference(processor, image, size={"shortest_edge": low, "longest_edge": high})
        assert_same(ours, ref, processor)
    # one bound alone keeps the config's other bound
    ours = preprocess_image(image, config, max_pixels=f * f * 100)
    ref = reference(processor, image, size={"shortest_edge": config.min_pixels, "longest_edge": f * f * 100})
    assert_same(ours, ref, processor)
    assert ours.num_tokens <= 100


@pytest.mark.parametrize("family", FAMILIES)
def test_resized_height_width(processors, family):
    """qwen-vl-utils semantics: the asked size goes through smart_resize, then PIL BICUBIC; the processor
    then sees an image already at a smart_resize fixed point and does not resize again."""
    config, processor = processors[family]
    image = _rgba(333, 517)
    for asked in ((300, 500), (10, 10), (5000, 5000), (123, 45)):
        size = hf_smart_resize(
            *asked, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
        pre = load_image(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)
        assert (
            hf_smart_resize(
                *size, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
            )
            == size
        )  # no second resize
        ours = preprocess_image(image, config, resized_height=asked[0], resized_width=asked[1])
        assert ours.resized_size == size and ours.original_size == (333, 517)
        assert_same(ours, reference(processor, pre), processor)


def test_smart_resize_matches_transformers_on_integers():
    rng = np.random.default_rng(13)
    sides = np.concatenate([rng.integers(1, 60, 300), rng.integers(1, 5000, 700)])
    budgets = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (65536, 16777216), (1, 100), (4096, 4096)]
    checked = 0
    for factor in (28, 32):
        for low, high in budgets:
            for h, w in zip(sides, rng.permutation(sides), strict=True):
                h, w = int(h), int(w)
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(InputError, match="aspect ratio"):
                        smart_resize(h, w, factor, low, high)
                    continue
                assert smart_resize(h, w, factor, low, high) == hf_smart_resize(h, w, factor, low, high)
                checked += 1
    assert checked > 5000
    # figures quoted in the design notes
    assert smart_resize(240, 320, 28, 3136, 28 * 28 * 256) == (252, 308)
    assert smart_resize(240, 320, 32, 3136, 32 * 32 * 256) == (256, 320)
    assert smart_resize(1024, 1024, 28, 3136, 12845056) == (1036, 1036)  # 1369 tokens on Qwen2.5-VL
    assert smart_resize(1024, 1024, 32, 65536, 16777216) == (1024, 1024)  # 1024 tokens on Qwen3-VL
    assert smart_resize(1, 200, 28, 3136, 1003520) == (28, 812)  # ratio exactly 200 is allowed


# ---------------------------------------------------------------------------------------------- sources


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_source_kind_gives_the_same_image(tmp_path):
    original = _rgba(40, 60)
    data = png_bytes(original)
    path = tmp_path / "a b%.png"  # a space and a percent sign must survive the file:// round trip
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # MIME-style line breaks
    expected = np.asarray(load_image(original))
    sources = [
        data,
        bytearray(data),
        path,
        str(path),
        path.as_uri(),
        f"data:image/png;base64,{encoded}",
        f"data:image/png;base64,{wrapped}",
        f"data:image/png;base64,{encoded.rstrip('=')}",
    ]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (60, 40)
        assert np.array_equal(np.asarray(image), expected)
    assert expected[0, 0].tolist() == [255, 255, 255]  # the transparent band is white, not black


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda d: d / "missing.png", "does not exist"),
        (lambda d: str(d / "missing.png"), "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "notes.png", b"just some text, not pixels"), "is not an image"),
        (lambda d: _write(d / "empty.png", b""), "is empty"),
        (
            lambda d: _write(d / "cut.png", png_bytes(Image.fromarray(picture(64, 64)))[:300]),
            "could not decode",
        ),
        (lambda d: "ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        (lambda d: "file://otherhost/a.png", "remote host"),
        (lambda d: "data:image/png;base64,not*valid*base64!!", "not valid base64"),
        (lambda d: "data:image/png;base64,abcde", "not valid base64"),
        (lambda d: "data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        (lambda d: "data:image/png,rawbytes", "not base64-encoded"),
        (lambda d: "data:image/png;base64", "no ','"),
        (lambda d: "data:image/png;base64,aGVsbG8gd29ybGQ=", "is not an image"),
        (lambda d: b"\x89PNG\r\n\x1a\n garbage", "could not decode|is not an image"),
        (lambda d: 42, "unsupported image input of type int"),
        (lambda d: Image.new("RGB", (0, 5)), "side of 0"),
    ],
)
def test_bad_sources(tmp_path, make_source, message):
    with pytest.raises(InputError, match=message):
        load_image(make_source(tmp_path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_data_url_size_limit():
    payload = base64.b64encode(png_bytes(Image.fromarray(picture(64, 64)))).decode()
    with pytest.raises(InputError, match="limit"):
        load_image(f"data:image/png;base64,{payload}", max_bytes=100)


def test_bad_images_and_arguments(processors):
    config, _ = processors["qwen2_vl"]
    image = Image.fromarray(picture(50, 60))
    with pytest.raises(InputError, match="aspect ratio of 201"):
        preprocess_image(Image.new("RGB", (201, 1)), config)
    with pytest.raises(InputError, match="aspect ratio"):
        preprocess_image(Image.new("RGB", (1, 300)), config)
    with pytest.raises(InputError, match="side of 0"):
        preprocess_image(Image.new("RGB", (5, 0)), config)
    with pytest.raises(InputError, match="side of 0"):
        smart_resize(0, 10, 28, 3136, 1003520)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(1, 201, 28, 3136, 1003520)
    bad = [
        ({"min_pixels": 0}, "min_pixels must be a positive integer"),
        ({"max_pixels": -5}, "max_pixels must be a positive integer"),
        ({"min_pixels": 2.5}, "min_pixels must be a positive integer"),
        ({"min_pixels": True}, "min_pixels must be a positive integer"),
        ({"min_pixels": 10000, "max_pixels": 5000}, r"max_pixels \(5000\) is below min_pixels"),
        ({"resized_height": 100}, "pass both or neither"),
        ({"resized_width": 100}, "pass both or neither"),
        ({"resized_height": 0, "resized_width": 100}, "resized_height must be a positive integer"),
        ({"resized_height": 1, "resized_width": 300}, "aspect ratio"),
    ]
    for kwargs, message in bad:
        with pytest.raises(InputError, match=message):
            preprocess_image(image, config, **kwargs)
    with pytest.raises(InputError) as info:
        preprocess_image(image, config, max_pixels=0)
    assert info.value.param == "max_pixels"  # the API layer can point at the offending field
    with pytest.raises(InputError, match="does not exist"):
        preprocess_image("/no/such/image.png", config)


def test_bad_configs(tmp_path):
    with pytest.raises(ModelLoadError, match="no image preprocessing is known for model family 'llava'"):
        ImageProcessorConfig.for_family("llava")
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not read"):
        ImageProcessorConfig.from_dir(tmp_path, "qwen2_vl")
    for data, message in (
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be a number or a list of 3"),
        ({"image_std": [0.5, 0, 0.5]}, "image_std has a zero"),
        ({"size": {"shortest_edge": 5000, "longest_edge": 100}}, "is below min_pixels"),
        ({"resample": 99}, "bad image preprocessing config"),
    ):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
        with pytest.raises(ModelLoadError, match=message):
            ImageProcessorConfig.from_dir(tmp_path, "qwen3_vl")


# ------------------------------------------------------------------------------------------------- http

LIMIT = 4096


class _Handler(BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        if self.path == "/ok.png":
            self._send(200, self.png, "image/png")
        elif self.path == "/big-with-length":
            self._send(200, b"\0" * (LIMIT + 1), "image/png")
        elif self.path == "/big-no-length":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when the connection closes
            self._write(b"\0" * (LIMIT * 3))
        elif self.path == "/page":
            self._send(200, b"<html><body>not an image</body></html>", "text/html")
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, self.png, "image/png")
        else:
            self._send(404, b"nothing here", "text/plain")

    def _send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body)

    def _write(self, body):
        try:
            self.wfile.write(body)
        except OSError:  # the client hung up early, which is what a size limit does
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    _Handler.png = png_bytes(Image.fromarray(picture(30, 40, 14)))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("no_proxy", "127.0.0.1,localhost")  # a proxy in the environment must not see these
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_success(server):
    image = load_image(f"{server}/ok.png")
    assert np.array_equal(np.asarray(image), np.asarray(load_image(_Handler.png)))


@pytest.mark.parametrize(
    "path, kwargs, message",
    [
        ("/missing.png", {}, r"/missing.png: HTTP 404 Not Found"),
        ("/big-with-length", {"max_bytes": LIMIT}, rf"{LIMIT + 1} bytes, over the {LIMIT}-byte limit"),
        ("/big-no-length", {"max_bytes": LIMIT}, rf"over the {LIMIT}-byte limit"),
        ("/page", {}, r"/page \(Content-Type 'text/html'\) is not an image"),
        ("/slow", {"timeout": 0.3}, r"/slow: timed out after 0.3 s"),
    ],
)
def test_http_errors(server, path, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_image(f"{server}{path}", **kwargs)


def test_http_connection_refused():
    import socket

    with socket.socket() as sock:  # a port nothing listens on: bound, never listened, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png"
    with pytest.raises(InputError, match=rf"could not fetch image {url}: .*refused"):
        load_image(url, timeout=2)
