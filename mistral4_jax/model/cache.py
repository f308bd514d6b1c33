"""The latent KV cache: per layer group the compressed latent and the shared rope key, plus which slots
hold real tokens."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules
from .params import layer_groups

Array = jax.Array


@flax.struct.dataclass
class LayerCache:
    """One layer group's latent cache: latent [Lg, B, S, L] and the shared rope key k_rope [Lg, B, S, R]
    (one layer's slice, [B, S, L] and [B, S, R], inside the layer loop)."""

    latent: Array
    k_rope: Array


@flax.struct.dataclass
class Cache:
    """The latent KV cache: `valid` [B, S] (which slots hold real tokens) and, per layer group name
    ("layers_dense", "layers_moe"), its `LayerCache`. kv_lora + qk_rope numbers per token per layer."""

    valid: Array
    groups: dict[str, LayerCache]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]


def init_cache(cfg: Mistral4Config, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty latent KV cache of `batch` rows and `max_len` slots (see `Cache`)."""
    groups = {name: LayerCache(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                               jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))
              for name, n, _ in layer_groups(cfg)}
    return Cache(jnp.zeros((batch, max_len), bool), groups)


CACHE_AXES = {"valid": ("cache_batch", "cache_seq"),
              "latent": ("layers", "cache_batch", "cache_seq", "kv_lora"),
              "k_rope": ("layers", "cache_batch", "cache_seq", "rope_dim")}
"""Logical axes of the cache arrays (`Cache.valid` and each `LayerCache`'s latent and k_rope)."""


def cache_shardings(mesh: Mesh, cache: Cache, rules: ShardingRules = DEFAULT_RULES) -> Cache:
    """NamedSharding for each array of a cache from `init_cache` by `rules` (a dimension its mesh axis does not
    divide, e.g. the batch, is replicated), as a `Cache` of shardings."""
    def fit(kind: str, shape: tuple[int, ...], what: str) -> NamedSharding:
        spec = rules.spec(CACHE_AXES[kind], f"cache {what}")
        return NamedSharding(mesh, P(*(s if s is None or d % mesh.shape[s] == 0 else None for s, d in zip(spec, shape))))

    groups = {name: LayerCache(fit("latent", g.latent.shape, f"{name}/latent"), fit("k_rope", g.k_rope.shape, f"{name}/k_rope"))
              for name, g in cache.groups.items()}
    return Cache(fit("valid", cache.valid.shape, "valid"), groups)
