"""Image input for the Qwen vision-language models: loading (fetch.py) and preprocessing (image.py)."""

from .fetch import ImageSource, load_image, to_rgb
from .image import ImageProcessorConfig, ProcessedImage, preprocess_image, smart_resize

__all__ = [
    "ImageProcessorConfig",
    "ImageSource",
    "ProcessedImage",
    "load_image",
    "preprocess_image",
    "smart_resize",
    "to_rgb",
]
