"""Image and video input for the Qwen vision-language models: loading (fetch.py), image preprocessing
(image.py) and video probing, sampling, decoding and preprocessing (video.py)."""

from .fetch import ImageSource, load_image, to_rgb
from .grounding import (
    Grounding,
    GroundingResult,
    draw_groundings,
    ground_answer,
    label_colours,
    parse_groundings,
    to_image_pixels,
)
from .image import ImageProcessorConfig, ProcessedImage, preprocess_image, smart_resize
from .video import (
    SAMPLING_RULES,
    VIDEO_OPTION_KEYS,
    ProcessedVideo,
    VideoPlan,
    VideoProbe,
    VideoProcessorConfig,
    VideoSource,
    grid_timestamps,
    plan_video,
    preprocess_video,
    probe_video,
    process_video_plan,
)

__all__ = [
    "SAMPLING_RULES",
    "VIDEO_OPTION_KEYS",
    "Grounding",
    "GroundingResult",
    "ImageProcessorConfig",
    "ImageSource",
    "ProcessedImage",
    "ProcessedVideo",
    "VideoPlan",
    "VideoProbe",
    "VideoProcessorConfig",
    "VideoSource",
    "draw_groundings",
    "ground_answer",
    "grid_timestamps",
    "label_colours",
    "load_image",
    "parse_groundings",
    "plan_video",
    "preprocess_video",
    "preprocess_image",
    "probe_video",
    "process_video_plan",
    "smart_resize",
    "to_image_pixels",
    "to_rgb",
]
