"""The engine: sampling, the KV cache and the generation loop."""
