"""The package's own exceptions.

Every error a user can cause is one of these; the CLI maps them to exit code 2 and one line on stderr.
They subclass ValueError so callers that already catch bad-argument errors keep working.
"""


class QwenEngineError(ValueError):
    """Base class of every error qwen-engine raises on purpose."""


class ModelLoadError(QwenEngineError):
    """The model could not be found, read or understood."""


class DemoModelError(ModelLoadError):
    """The bundled demo model is missing or damaged."""


class InputError(QwenEngineError):
    """Bad messages, prompts or sampling parameters. `param` names the offending field, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InputError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""
