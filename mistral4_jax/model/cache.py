"""The latent KV cache: per layer group the compressed latent and the shared rope key, plus which slots
hold real tokens."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules
from .params import layer_groups


def init_cache(cfg: Mistral4Config, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """An empty latent KV cache: per layer group latent [Lg, B, S, L] and k_rope [Lg, B, S, R], plus
    `valid` [B, S] (which slots hold real tokens). kv_lora + qk_rope numbers per token per layer."""
    cache: dict[str, Any] = {"valid": jnp.zeros((batch, max_len), bool)}
    for name, n, _ in layer_groups(cfg):
        cache[name] = (jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                       jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))
    return cache


CACHE_AXES = {"valid": ("cache_batch", "cache_seq"),
              "latent": ("layers", "cache_batch", "cache_seq", "kv_lora"),
              "k_rope": ("layers", "cache_batch", "cache_seq", "rope_dim")}
"""Logical axes of the cache arrays (the per-group (latent, k_rope) pair and `valid`)."""


def cache_shardings(mesh: Mesh, cache: dict[str, Any], rules: ShardingRules = DEFAULT_RULES) -> Any:
    """NamedSharding for a cache from `model.init_cache` by `rules` (a dimension its mesh axis does not
    divide, e.g. the batch, is replicated)."""
    def fit(kind: str, shape: tuple[int, ...], what: str) -> NamedSharding:
        spec = rules.spec(CACHE_AXES[kind], f"cache {what}")
        return NamedSharding(mesh, P(*(s if s is None or d % mesh.shape[s] == 0 else None for s, d in zip(spec, shape))))

    out = {"valid": fit("valid", cache["valid"].shape, "valid")}
    for name, pair in cache.items():
        if name != "valid":
            out[name] = (fit("latent", pair[0].shape, f"{name}/latent"), fit("k_rope", pair[1].shape, f"{name}/k_rope"))
    return out
