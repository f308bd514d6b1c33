"""mistral4-jax: the JAX/Flax port of Mistral Small 4.

    model = mistral4_jax.load("path/to/hf-checkpoint", dtype="float32")
    logits = model.logits(input_ids)          # float32 numpy [B, T, vocab]
"""

from .api import Mistral4
from .weights.load import load
from .config import Mistral4Config

__all__ = ["Mistral4", "Mistral4Config", "load"]
__version__ = "0.1.0"
