"""Finding and reading model files: GGUF, safetensors folders and the bundled demo model."""
