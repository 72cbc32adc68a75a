"""qwen-engine: a small, readable inference engine for the Qwen model family."""

from .api import LLM
from .engine.sampling_params import SamplingParams
from .errors import ContextLengthError, InputError, ModelLoadError, QwenEngineError
from .outputs import RequestOutput, StreamDelta, Usage

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "StreamDelta",
    "Usage",
    "QwenEngineError",
    "ModelLoadError",
    "InputError",
    "ContextLengthError",
]
__version__ = "0.1.0"
