"""Video input for the Qwen VL families, against transformers 5.23's video processors and qwen-vl-utils.

The videos are made here with PyAV (H.264 in mp4, VP8 in webm, FFV1 in mkv, MPEG-4 in mov; odd sides and
odd frame counts; a moving square and bar over a noisy gradient, so every frame differs and the resampler
sees hard edges).

References:
* "transformers" rule: transformers' own ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` loaded by
  AutoVideoProcessor from the same video_preprocessor_config.json our VideoProcessorConfig reads, fed the
  frames decoded by transformers' PyAV reader (``load_video(backend="pyav")``), sampling on
  (``do_sample_frames=True``).
* "qwen-vl-utils" rule (the default): the released pipeline, qwen-vl-utils' ``fetch_video`` then the
  processor with ``do_sample_frames=False``. qwen-vl-utils itself cannot be installed here (it imports
  torchaudio and needs a video backend that works offline), so its frame choice and sizing are
  transcribed below from its source (``smart_nframes``, ``fetch_video``, ``smart_resize``) and its resize
  is the very call it makes, torchvision's v1 ``transforms.functional.resize(BICUBIC, antialias=True)``;
  the result goes through transformers' processor as the Qwen READMEs do (``do_resize=False`` for
  Qwen3-VL; a no-op resize for Qwen2/2.5-VL).
Both rules run the same torch kernels as their reference on the same decoded frames, so pixel_values are
compared for exact equality (0.0, not a tolerance). Grids, token counts, frame indices and timestamps are
integers or exact float expressions and must match exactly.

transformers' video processors need torchvision, installed by the dev extra (its CUDA wheel imports beside
CPU torch only with the shim in video_helpers, which must run before transformers is imported). Without
torchvision the processor comparisons are skipped; the sampling, timestamp, decoding and bad-input tests
still run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from video_helpers import (
    define_torchvision_ops,
    moving_frames,
    write_empty_video,
    write_undecodable_video,
    write_video,
)

define_torchvision_ops()  # before anything below imports transformers (see video_helpers)

from qwen_engine.errors import InputError, ModelLoadError  # noqa: E402
from qwen_engine.vision import (  # noqa: E402
    VideoProcessorConfig,
    grid_timestamps,
    plan_video,
    preprocess_video,
    probe_video,
    process_video_plan,
)
from qwen_engine.vision import video as video_module  # noqa: E402

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="transformers' video processors need torchvision (installed by the dev extra)"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# video_preprocessor_config.json per family: Qwen2-VL with nothing but the type (the class defaults:
# 128..768 tokens per frame), Qwen2.5-VL with the pixel bounds its checkpoints ship (per frame),
# Qwen3-VL as its checkpoints ship it (bounds over t*h*w, fps 2, 4..768 frames).
CONFIGS = {
    "qwen2_vl": {"video_processor_type": "Qwen2VLVideoProcessor"},
    "qwen2_5_vl": {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    },
    "qwen3_vl": {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "do_sample_frames": True,
        "fps": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_frames": 768,
        "merge_size": 2,
        "min_frames": 4,
        "patch_size": 16,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "temporal_patch_size": 2,
    },
}
FAMILIES = list(CONFIGS)

# name: (frames, height, width, fps, codec, file suffix)
VIDEOS = {
    "mp4": (24, 48, 64, 8, "libx264", ".mp4"),
    "odd_mp4": (17, 75, 101, 6, "libx264", ".mp4"),  # odd sides (yuv444p) and an odd frame count
    "webm": (40, 90, 160, 24, "libvpx", ".webm"),  # no frame count in the header: packets are counted
    "mkv": (16, 37, 53, 8, "ffv1", ".mkv"),  # lossless RGB, odd sides
    "mov": (16, 48, 64, 8, "mpeg4", ".mov"),  # the 16-frame 8 fps clip of qwen-vl-utils' example
    "aligned": (12, 84, 112, 4, "libx264", ".mp4"),  # already on the 28-pixel grid
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    paths = {}
    for seed, (name, (count, height, width, fps, codec, suffix)) in enumerate(VIDEOS.items()):
        frames = moving_frames(count, height, width, seed=seed)
        paths[name] = write_video(folder / f"{name}{suffix}", frames, fps=fps, codec=codec)
    return paths


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """family -> (folder holding video_preprocessor_config.json, our config read from it)."""
    result = {}
    for family, data in CONFIGS.items():
        folder = tmp_path_factory.mktemp(family)
        (folder / "video_preprocessor_config.json").write_text(json.dumps(data))
        result[family] = (folder, VideoProcessorConfig.from_dir(folder, family))
    return result


@pytest.fixture(scope="module")
def hf_processors(configs):
    if not HAS_TORCHVISION:
        pytest.skip("transformers' video processors need torchvision")
    from transformers import AutoVideoProcessor

    result = {}
    for family, (folder, _) in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result[family] = AutoVideoProcessor.from_pretrained(folder)
    return result


def hf_decode(path, indices=None):
    """Frames decoded by transformers' PyAV reader: all of them, or those at `indices`, with its metadata.

    That reader takes the frame count from the container header, which webm and mkv files lack (it then
    fails on an empty index list); for those the same decode loop runs here with the frames counted."""
    import av
    from transformers.video_utils import VideoMetadata, load_video

    def choose(metadata, **kwargs):
        return np.arange(metadata.total_num_frames) if indices is None else np.asarray(indices)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        header_count, rate = stream.frames, float(stream.average_rate)
        if not header_count:
            all_frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if header_count:
        return load_video(str(path), backend="pyav", sample_indices_fn=choose)
    metadata = VideoMetadata(total_num_frames=len(all_frames), fps=rate, video_backend="pyav")
    chosen = choose(metadata)
    metadata.frames_indices = chosen
    return np.stack([all_frames[i] for i in chosen]), metadata


def run_hf(processor, videos, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(videos=videos, return_tensors="pt", cap_pixels_per_frame=False, **kwargs)


# --------------------------------------------------------------------------------------------------------
# qwen-vl-utils, transcribed from its source (qwen_vl_utils/vision_process.py) as the reference


def qvu_smart_resize(height, width, factor, min_pixels=None, max_pixels=None):
    max_pixels = max_pixels if max_pixels is not None else 16384 * factor**2
    min_pixels = min_pixels if min_pixels is not None else 4 * factor**2
    assert max_pixels >= min_pixels
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qvu_smart_nframes(ele, total_frames, video_fps):
    assert not ("fps" in ele and "nframes" in ele)
    if "nframes" in ele:
        nframes = round(ele["nframes"] / 2) * 2
    else:
        fps = ele.get("fps", 2.0)
        min_frames = math.ceil(ele.get("min_frames", 4) / 2) * 2
        max_frames = math.floor(ele.get("max_frames", min(768, total_frames)) / 2) * 2
        nframes = total_frames / video_fps * fps
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = math.floor(nframes / 2) * 2
    if not (2 <= nframes <= total_frames):
        raise ValueError(f"nframes should in interval [2, {total_frames}], but got {nframes}.")
    return nframes


def qvu_sample(ele, total_frames, video_fps):
    """(indices, sample_fps) as qwen-vl-utils' decord/torchcodec readers compute them."""
    nframes = qvu_smart_nframes(ele, total_frames, video_fps)
    idx = torch.linspace(0, total_frames - 1, nframes).round().long().tolist()
    return idx, nframes / max(total_frames, 1e-6) * video_fps


def qvu_frame_size(ele, nframes, height, width, patch_size):
    factor = patch_size * 2
    min_pixels = ele.get("min_pixels", 128 * factor * factor)
    total_pixels = ele.get("total_pixels", 128000 * factor * factor * 0.9)
    max_pixels = max(min(768 * factor * factor, total_pixels / nframes * 2), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in ele and "resized_width" in ele:
        return qvu_smart_resize(ele["resized_height"], ele["resized_width"], factor)
    return qvu_smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)


def qvu_resize(frames_thwc, size):
    """qwen-vl-utils' resize call, verbatim: torchvision v1 functional resize on the uint8 TCHW video."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    video = torch.tensor(frames_thwc).permute(0, 3, 1, 2)
    return transforms.functional.resize(
        video, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True
    ).float()


# --------------------------------------------------------------------------------------------------------
# Parity with transformers' video processors


@needs_torchvision
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["mp4", "odd_mp4", "webm", "mkv", "aligned"])
def test_transformers_rule_matches_hf_video_processor(family, name, videos, configs, hf_processors):
    """do_sample_frames=True on the whole decoded video: same frames, grid, tokens and pixels."""
    path = videos[name]
    frames, metadata = hf_decode(path)
    reference = run_hf(
        hf_processors[family],
        [frames],
        video_metadata=[metadata],
        do_sample_frames=True,
        fps=2,
        return_metadata=True,
    )
    ours = preprocess_video(path, configs[family][1], sampling="transformers", fps=2)

    assert ours.frame_indices == [int(i) for i in reference["video_metadata"][0].frames_indices]
    assert ours.grid_thw == tuple(reference["video_grid_thw"][0].tolist())
    assert ours.num_tokens == int(reference["video_grid_thw"][0].prod()) // 4
    assert ours.pixel_values.dtype == torch.float32
    assert torch.equal(ours.pixel_values, reference["pixel_values_videos"])  # bit for bit
    assert ours.sample_fps == reference["video_metadata"][0].sampled_fps


@needs_torchvision
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_rule_frames_given_to_hf_unsampled(family, videos, configs, hf_processors):
    """do_sample_frames=False fed our sampled frames (decoded by transformers' reader): same result."""
    config = configs[family][1]
    plan = plan_video(
        videos["odd_mp4"], config, sampling="transformers", nframes=5 if family == "qwen3_vl" else 6
    )
    frames, metadata = hf_decode(videos["odd_mp4"], plan.frame_indices)
    reference = run_hf(hf_processors[family], [frames], video_metadata=[metadata], do_sample_frames=False)
    ours = process_video_plan(plan)
    assert ours.grid_thw == tuple(reference["video_grid_thw"][0].tolist())
    assert torch.equal(ours.pixel_values, reference["pixel_values_videos"])


QVU_OPTIONS = [
    {},
    {"fps": 4.0},
    {"nframes": 6},
    {"fps": 1.0, "min_frames": 2, "max_frames": 6},
    {"min_pixels": 8 * 784, "total_pixels": 16000},  # a small budget: frames are scaled down
    {"max_pixels": 200 * 784},
    {"resized_height": 100, "resized_width": 150},
]


@needs_torchvision
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["mp4", "odd_mp4", "webm", "mkv"])
@pytest.mark.parametrize("option_index", range(len(QVU_OPTIONS)))
def test_qwen_vl_utils_rule_matches_released_pipeline(
    family, name, option_index, videos, configs, hf_processors
):
    """qwen-vl-utils' fetch_video (transcribed sampling and sizing, its own resize call) followed by
    transformers' processor with do_sample_frames=False, as the Qwen READMEs run it."""
    options = QVU_OPTIONS[option_index]
    path, config = videos[name], configs[family][1]
    probe = probe_video(path)
    indices, sample_fps = qvu_sample(options, probe.num_frames, probe.fps)
    size = qvu_frame_size(options, len(indices), probe.height, probe.width, config.patch_size)

    frames, _ = hf_decode(path, indices)
    qvu_video = qvu_resize(frames, size)
    metadata = {"fps": probe.fps, "frames_indices": indices, "total_num_frames": probe.num_frames}
    reference = run_hf(
        hf_processors[family],
        [qvu_video],
        video_metadata=[metadata],
        do_sample_frames=False,
        # Qwen3-VL's README passes do_resize=False. Qwen2/2.5-VL's run the processor's resize, a no-op on
        # these frames with the bounds their checkpoints ship (qwen2_5_vl here). The class defaults of the
        # qwen2_vl config here have a 128-token floor that would scale small budgets back up.
        do_resize=family == "qwen2_5_vl",
    )
    ours = preprocess_video(path, config, **options)

    assert ours.frame_indices == indices
    assert ours.sample_fps == sample_fps
    assert ours.resized_size == size
    assert ours.grid_thw == tuple(reference["video_grid_thw"][0].tolist())
    assert ours.num_tokens == int(reference["video_grid_thw"][0].prod()) // 4
    assert torch.equal(ours.pixel_values, reference["pixel_values_videos"])  # bit for bit

    # Qwen3-VL's prompt timestamps and Qwen2.5-VL's time step, from the same metadata
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    assert ours.grid_timestamps == Qwen3VLProcessor._calculate_timestamps(None, indices, probe.fps, 2)
    assert ours.frame_timestamps == VideoMetadata(**metadata).timestamps
    assert ours.second_per_grid_t == 2 / VideoMetadata(**metadata).sampled_fps


@needs_torchvision
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", ["qwen-vl-utils", "transformers"])
def test_frame_lists(family, sampling, tmp_path, configs, hf_processors):
    """A list of frames (PIL images or image files): all used, an odd count padded with the last frame."""
    config = configs[family][1]
    arrays = moving_frames(5, 61, 83, seed=7)
    images = [Image.fromarray(a) for a in arrays]
    files = []
    for index, image in enumerate(images):
        image.save(tmp_path / f"f{index}.png")
        files.append(str(tmp_path / f"f{index}.png"))

    ours = preprocess_video(images, config, sampling=sampling)
    assert preprocess_video(files, config, sampling=sampling).pixel_values.equal(ours.pixel_values)
    assert ours.frame_indices == [0, 1, 2, 3, 4, 4]
    assert ours.num_frames_total == 5
    assert ours.sample_fps == 2.0
    assert ours.frame_timestamps == [i / 2.0 for i in range(6)]  # qwen-vl-utils' faked metadata: 0..n-1
    assert ours.grid_timestamps == [0.25, 1.25, 2.25]

    if sampling == "transformers":
        reference = run_hf(hf_processors[family], [images], do_sample_frames=False)
    else:
        padded = np.concatenate([arrays, arrays[-1:]])
        size = qvu_frame_size({}, len(padded), 61, 83, config.patch_size)
        reference = run_hf(
            hf_processors[family], [qvu_resize(padded, size)], do_sample_frames=False, do_resize=False
        )
    assert ours.grid_thw == tuple(reference["video_grid_thw"][0].tolist())
    assert torch.equal(ours.pixel_values, reference["pixel_values_videos"])


@needs_torchvision
def test_the_two_resize_paths_differ(videos):
    """Why each rule keeps its own resize: qwen-vl-utils' float path and transformers' uint8 path give
    different pixels (measured: up to 12 grey levels, mean ~0.17, on frames like these, at the hard edges)."""
    import torchvision.transforms.v2.functional as tvF

    frames, _ = hf_decode(videos["mkv"], [0, 5])
    size = (112, 168)
    float_path = qvu_resize(frames, size)
    uint8_path = tvF.resize(
        torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
        list(size),
        interpolation=tvF.InterpolationMode.BICUBIC,
        antialias=True,
    ).float()
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(video_module._resize(video, size, "qwen-vl-utils", 3).float(), float_path)
    assert torch.equal(video_module._resize(video, size, "transformers", 3).float(), uint8_path)
    difference = (float_path - uint8_path).abs().max().item()
    assert 1 <= difference <= 16


# --------------------------------------------------------------------------------------------------------
# Frame choice and timestamps


def test_qwen_vl_utils_documented_example(videos):
    """qwen-vl-utils: a 16-frame 8 fps clip sampled at fps=4 gives these 8 frames and sample_fps 4.0."""
    plan = plan_video(videos["mov"], VideoProcessorConfig.for_family("qwen2_5_vl"), fps=4.0)
    assert plan.num_frames_total == 16 and plan.video_fps == 8.0
    assert list(plan.frame_indices) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert plan.sample_fps == 4.0
    assert plan.second_per_grid_t == 0.5
    assert plan.grid_thw[0] == 4


def test_qwen_vl_utils_sampling_rule_over_a_grid():
    cases = 0
    for total in [1, 2, 3, 4, 5, 7, 8, 16, 17, 31, 64, 100, 301, 1000, 2000]:
        for video_fps in [1.0, 7.5, 24.0, 29.97002997002997, 30.0, 60.0]:
            for ele in [
                {},
                {"fps": 0.5},
                {"fps": 4.0},
                {"nframes": 4},
                {"nframes": 9},
                {"min_frames": 6, "max_frames": 11},
            ]:
                try:
                    expected = qvu_sample(ele, total, video_fps)
                except ValueError:
                    expected = None
                try:
                    count = video_module.qwen_vl_utils_nframes(
                        total,
                        video_fps,
                        fps=ele.get("fps", 2.0),
                        nframes=ele.get("nframes"),
                        min_frames=ele.get("min_frames", 4),
                        max_frames=ele.get("max_frames"),
                    )
                    got = (video_module.qwen_vl_utils_indices(total, count), count / total * video_fps)
                except InputError:
                    got = None
                assert got == expected, (total, video_fps, ele)
                cases += 1
    assert cases == 15 * 6 * 6


def test_qwen3_sampling_matches_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    for total in [1, 2, 3, 5, 16, 17, 40, 301, 2000]:
        for video_fps in [1.0, 8.0, 23.976023976023978, 30.0]:
            for fps in [0.5, 2.0, 4.0]:
                for low, high in [(4, 768), (2, 10)]:
                    processor = SimpleNamespace(fps=2, min_frames=low, max_frames=high)
                    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
                    expected = Qwen3VLVideoProcessor.sample_frames(processor, metadata, fps=fps).tolist()
                    got = video_module.transformers_frame_indices(
                        "qwen3_vl", total, video_fps, fps=fps, min_frames=low, max_frames=high
                    )
                    assert got == expected, (total, video_fps, fps, low, high)


@needs_torchvision
def test_qwen2_sampling_matches_transformers():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    for total in [2, 3, 5, 16, 17, 40, 301, 2000]:
        for video_fps in [1.0, 8.0, 23.976023976023978, 30.0]:
            for kwargs in [{"fps": 0.5}, {"fps": 2.0}, {"fps": 4.0}, {"num_frames": 4}, {"num_frames": 7}]:
                processor = SimpleNamespace(
                    fps=None, num_frames=None, temporal_patch_size=2, min_frames=4, max_frames=768
                )
                metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
                try:
                    expected = Qwen2VLVideoProcessor.sample_frames(processor, metadata, **kwargs).tolist()
                except (ValueError, ZeroDivisionError):
                    expected = None
                try:
                    got = video_module.transformers_frame_indices(
                        "qwen2_vl", total, video_fps, fps=kwargs.get("fps"), nframes=kwargs.get("num_frames")
                    )
                except InputError:
                    got = None
                assert got == expected, (total, video_fps, kwargs)


def test_timestamps_match_transformers():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    rng = np.random.default_rng(0)
    for length in [1, 2, 3, 4, 7, 8, 33]:
        indices = sorted(rng.integers(0, 500, size=length).tolist())
        for video_fps in [1.0, 8.0, 29.97, 30.0]:
            expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), video_fps, 2)
            assert grid_timestamps(indices, video_fps, 2) == expected


def test_timestamps_for_the_prompt(videos):
    """Qwen3-VL's prompt writes <t seconds> per temporal patch; the values the oracle recorded for a
    16-frame 8 fps clip sampled at 2 fps are 0.3 and 1.6."""
    plan = plan_video(videos["mov"], VideoProcessorConfig.for_family("qwen3_vl"))
    assert list(plan.frame_indices) == [0, 5, 10, 15]
    assert [f"<{t:.1f} seconds>" for t in plan.grid_timestamps] == ["<0.3 seconds>", "<1.6 seconds>"]


# --------------------------------------------------------------------------------------------------------
# Probing, planning before decoding, decoding


@pytest.mark.parametrize("name", list(VIDEOS))
def test_probe_reads_the_header(name, videos):
    count, height, width, fps, _, _ = VIDEOS[name]
    probe = probe_video(videos[name])
    assert (probe.num_frames, probe.height, probe.width, probe.fps) == (count, height, width, fps)
    assert probe.duration == count / fps
    assert probe_video(videos[name].as_uri()) == probe  # a file:// URL names the same file


def test_token_budget_is_checked_before_decoding(videos, monkeypatch):
    config = VideoProcessorConfig.for_family("qwen2_5_vl")
    plan = plan_video(videos["webm"], config)
    assert plan.num_tokens == plan.grid_thw[0] * plan.grid_thw[1] * plan.grid_thw[2] // 4

    def no_decoding(plan):
        raise AssertionError("frames were decoded for an over-budget video")

    monkeypatch.setattr(video_module, "_decode_frames", no_decoding)
    budget = plan.num_tokens - 1
    with pytest.raises(InputError, match=f"budget of {budget} tokens") as caught:
        preprocess_video(videos["webm"], config, max_tokens=budget)
    assert str(plan.num_tokens) in str(caught.value)
    with pytest.raises(InputError, match=f"budget of {budget} tokens"):
        plan_video(videos["webm"], config, max_tokens=budget)
    assert plan_video(videos["webm"], config, max_tokens=plan.num_tokens).num_tokens == plan.num_tokens


def test_plan_equals_result(videos):
    config = VideoProcessorConfig.for_family("qwen3_vl")
    plan = plan_video(videos["odd_mp4"], config, fps=3.0)
    result = process_video_plan(plan)
    t, h, w = plan.grid_thw
    assert result.pixel_values.shape == (t * h * w, 3 * 2 * 16 * 16)
    assert (result.grid_thw, result.num_tokens, result.resized_size) == (
        plan.grid_thw,
        plan.num_tokens,
        plan.resized_size,
    )
    assert result.original_size == (75, 101) and result.num_frames_total == 17


def test_header_over_counting_frames_is_replanned(videos, monkeypatch):
    """If the stream ends before a sampled frame (a header that over-counts), the frames are sampled
    again over the frames that decode, as a reader that counts frames would."""
    honest = preprocess_video(videos["mp4"], VideoProcessorConfig.for_family("qwen2_vl"), nframes=24)
    real_probe = video_module.probe_video

    def over_counting(source):
        probe = real_probe(source)
        return video_module.VideoProbe(**{**probe.__dict__, "num_frames": probe.num_frames + 6})

    monkeypatch.setattr(video_module, "probe_video", over_counting)
    config = VideoProcessorConfig.for_family("qwen2_vl")
    result = preprocess_video(videos["mp4"], config, nframes=24)  # planned over 30 frames, 24 decode
    assert result.num_frames_total == 24
    assert result.frame_indices == honest.frame_indices
    assert torch.equal(result.pixel_values, honest.pixel_values)


def test_single_frame_video(tmp_path):
    """qwen-vl-utils refuses a one-frame video (it needs 2 frames); here its frame is used twice. The
    transformers rule keeps the reference's refusal for Qwen3-VL (its smart_resize needs 2 frames)."""
    path = write_video(tmp_path / "one.mp4", moving_frames(1, 48, 64))
    result = preprocess_video(path, VideoProcessorConfig.for_family("qwen2_5_vl"))
    assert result.frame_indices == [0, 0] and result.grid_thw[0] == 1 and result.num_frames_total == 1
    rows = result.pixel_values.view(-1, 3, 2, 14 * 14)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])  # both temporal halves are the same frame
    with pytest.raises(InputError, match="at least 2 frames"):
        preprocess_video(path, VideoProcessorConfig.for_family("qwen3_vl"), sampling="transformers")


# --------------------------------------------------------------------------------------------------------
# Configuration


def test_config_sources(tmp_path):
    # nothing: family defaults
    assert VideoProcessorConfig.from_dir(tmp_path, "qwen3_vl") == VideoProcessorConfig.for_family("qwen3_vl")
    # preprocessor_config.json alone (what Qwen2.5-VL checkpoints ship): its pixel bounds
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 12845056})
    )
    config = VideoProcessorConfig.from_dir(tmp_path, "qwen2_5_vl")
    assert (config.min_pixels, config.max_pixels, config.factor) == (3136, 12845056, 28)
    # video_preprocessor_config.json wins over it
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 100, "longest_edge": 200}, "fps": 1})
    )
    config = VideoProcessorConfig.from_dir(tmp_path, "qwen2_5_vl")
    assert (config.min_pixels, config.max_pixels, config.fps) == (100, 200, 1.0)
    # and the "video_processor" part of processor_config.json wins over both
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"video_processor": {"max_frames": 32, "patch_size": 16}})
    )
    config = VideoProcessorConfig.from_dir(tmp_path, "qwen2_5_vl")
    assert (config.max_frames, config.patch_size, config.min_pixels) == (32, 16, 128 * 28 * 28)


@pytest.mark.parametrize(
    "data",
    [
        {"patch_size": 0},
        {"size": [1, 2]},
        {"image_std": [0.5, 0, 0.5]},
        {"resample": 1},
        {"fps": -2},
        {"min_frames": 10, "max_frames": 4},
        {"min_pixels": 500, "max_pixels": 100},
    ],
)
def test_bad_configs(tmp_path, data):
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError):
        VideoProcessorConfig.from_dir(tmp_path, "qwen2_vl")


def test_unknown_family():
    with pytest.raises(ModelLoadError, match="no video preprocessing"):
        VideoProcessorConfig.for_family("qwen2")


# --------------------------------------------------------------------------------------------------------
# Bad input: every failure is an InputError (a ValueError) with the reason


def test_bad_files(tmp_path):
    config = VideoProcessorConfig.for_family("qwen2_vl")
    (tmp_path / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "folder.mp4").mkdir()
    cases = {
        str(tmp_path / "missing.mp4"): "does not exist",
        (tmp_path / "missing.webm").as_uri(): "does not exist",
        str(tmp_path / "folder.mp4"): "is a directory",
        str(tmp_path / "text.mp4"): "is not a video FFmpeg can read",
        str(tmp_path / "empty.mp4"): "not a video|no decodable frames|could not open",
        str(write_empty_video(tmp_path / "no_frames.mkv")): "no decodable frames",
        str(write_empty_video(tmp_path / "no_frames.mp4", "mp4")): "no video stream",
        str(write_undecodable_video(tmp_path / "garbage.mkv")): "no decodable frames",
        "https://example.com/clip.mp4": "local files only",
        "ftp://example.com/clip.mp4": "unsupported URL scheme",
        "file://elsewhere/clip.mp4": "remote host",
    }
    for source, message in cases.items():
        with pytest.raises(InputError, match=message):
            preprocess_video(source, config)
    with pytest.raises(InputError, match="unsupported video input"):
        preprocess_video(12, config)  # type: ignore[arg-type]


def test_truncated_file(tmp_path, videos):
    data = videos["mp4"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    with pytest.raises(InputError, match="not a video FFmpeg can read"):
        probe_video(tmp_path / "cut.mp4")
    data = videos["mkv"].read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])  # streamable: the first frames remain
    result = preprocess_video(tmp_path / "cut.mkv", VideoProcessorConfig.for_family("qwen2_vl"))
    assert 2 <= result.num_frames_total < 16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fps": 0}, "fps must be a positive number"),
        ({"fps": -1.5}, "fps must be a positive number"),
        ({"fps": float("nan")}, "fps must be a positive number"),
        ({"fps": "2"}, "fps must be a positive number"),
        ({"nframes": 0}, "nframes must be a positive integer"),
        ({"nframes": 2.5}, "nframes must be a positive integer"),
        ({"nframes": True}, "nframes must be a positive integer"),
        ({"nframes": 1}, "cannot sample 0 frames"),
        ({"nframes": 100}, "cannot sample 100 frames from a video of 24"),
        ({"fps": 2.0, "nframes": 4}, "not both"),
        ({"min_frames": 0}, "min_frames must be a positive integer"),
        ({"min_frames": 8, "max_frames": 4}, "above max_frames"),
        ({"max_pixels": -5}, "max_pixels must be a positive number"),
        ({"min_pixels": 5000, "max_pixels": 100}, "below min_pixels"),
        ({"max_pixels": 100}, "below min_pixels"),  # under the default 128-token minimum
        ({"total_pixels": 0}, "total_pixels must be a positive number"),
        ({"resized_height": 100}, "go together"),
        ({"resized_height": 0, "resized_width": 5}, "resized_height must be a positive integer"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"sampling": "decord"}, "unknown video sampling rule"),
        ({"sampling": "transformers", "total_pixels": 1000}, "total_pixels belongs to the qwen-vl-utils"),
        ({"resolution": 3}, "unknown video option 'resolution'"),
    ],
)
def test_bad_options(options, message, videos):
    config = VideoProcessorConfig.for_family("qwen2_vl")
    with pytest.raises(InputError, match=message) as caught:
        preprocess_video(videos["mp4"], config, **options)
    assert isinstance(caught.value, ValueError)


def test_bad_frame_lists(tmp_path):
    config = VideoProcessorConfig.for_family("qwen2_vl")
    (tmp_path / "notes.png").write_text("not an image")
    small, large = Image.new("RGB", (40, 30)), Image.new("RGB", (60, 30))
    with pytest.raises(InputError, match="at least one frame"):
        preprocess_video([], config)
    with pytest.raises(InputError, match="must share one size"):
        preprocess_video([small, small, large], config)
    with pytest.raises(InputError, match="frame 1 of the video: .*not an image"):
        preprocess_video([small, str(tmp_path / "notes.png")], config)
    with pytest.raises(InputError, match="frame 0 of the video: .*does not exist"):
        preprocess_video([str(tmp_path / "gone.png")], config)
    with pytest.raises(InputError, match="aspect ratio"):
        preprocess_video([Image.new("RGB", (1000, 4))] * 2, config)
