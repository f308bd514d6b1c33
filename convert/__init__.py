"""The converter: HF / Mistral safetensors checkpoints (bf16, float32, FP8) to our Orbax checkpoint.

    mistral4-jax convert SRC DST [--dtype bfloat16|float16|float32|float8_e4m3fn] [--text-only] [--overwrite] [--resume]
    python -m mistral4_jax.convert SRC DST ...
    mistral4_jax.convert.convert(src, dst, dtype="bfloat16")

Installed as `mistral4_jax.convert` (the `convert/` folder is mapped there by pyproject.toml); the output
layout is documented in `mistral4_jax.weights.checkpoint`, the reading in `source` and `lazy`, the writing in `run`.
"""

from .run import OUTPUT_DTYPES, Interrupted, convert
from .source import Source, open_source

__all__ = ["OUTPUT_DTYPES", "Interrupted", "Source", "convert", "open_source"]
