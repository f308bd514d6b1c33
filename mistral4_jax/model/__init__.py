"""The text decoder: rope, MoE kernels, layers, the parameter tree, the latent cache, the forward pass.

Import order matters for `..vision` (which uses `rope.apply_rope`): rope first, the decoder last.
"""

from ..weights.quant import QuantArray, is_fp8
from .rope import apply_rope, llama4_query_scale, rope_cos_sin, rope_inv_freq
from .moe import EXPERT_CHUNK_ROWS, MOE_BACKENDS, resolve_moe_backend, route, routed_experts, sharded_routed_experts
from .params import (ParamSpec, abstract_params, init_params, layer_groups, param_axes, param_shardings, param_specs,
                     quantized_paths, stored_float_weights, unstack_layers)
from .cache import CACHE_AXES, Cache, LayerCache, cache_shardings, init_cache
from .decoder import forward
from .loss import IGNORE_INDEX, causal_lm_loss, cross_entropy

__all__ = [
    "CACHE_AXES", "EXPERT_CHUNK_ROWS", "IGNORE_INDEX", "causal_lm_loss", "cross_entropy", "MOE_BACKENDS", "ParamSpec", "QuantArray", "abstract_params", "apply_rope",
    "Cache", "LayerCache", "cache_shardings", "forward", "init_cache", "init_params", "is_fp8", "layer_groups", "llama4_query_scale",
    "param_axes", "param_shardings", "param_specs", "quantized_paths", "resolve_moe_backend", "rope_cos_sin",
    "rope_inv_freq", "route", "routed_experts", "sharded_routed_experts", "stored_float_weights", "unstack_layers",
]
