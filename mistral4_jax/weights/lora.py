"""LoRA adapters as a weight type: `LoraWeight` (a frozen base weight plus low-rank factors) is read wherever
a weight is read (`quant.dequantize`, hence `qeinsum` and the grouped-matmul experts), so the model code runs
unchanged with adapters and gradients reach the factors.

A weight w [*batch, *in, *out] (batch: stacked layers and/or experts; in/out: the dimensions the layer's einsum
contracts and produces, e.g. o_proj [N, V, D] has in (N, V), out (D)) gets a [*batch, *in, r] and
b [*batch, r, *out]; the weight read is w + scale * a @ b, scale = alpha / r, as PEFT's LoRA. `b` starts at
zero, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

IN_DIMS = {"o_proj": 2}
"""Input dimensions of a weight's own shape (after batch dims) where that is not 1: o_proj [N, V, D]."""

CORE_NDIM = {"q_a_proj": 2, "q_b_proj": 3, "q_proj": 3, "kv_a_proj": 2, "k_b_proj": 3, "v_b_proj": 3, "o_proj": 3,
             "gate_proj": 2, "up_proj": 2, "down_proj": 2, "experts_gate": 2, "experts_up": 2, "experts_down": 2}
"""The number of a weight's own dimensions (the rest, in front, are batch: layers, experts) for every weight a
LoRA adapter can target, by its name in the parameter tree."""


@struct.dataclass
class LoraWeight:
    """base (plain array or `QuantArray`) [*batch, *in, *out] + scale * a [*batch, *in, r] @ b [*batch, r, *out]."""

    base: Any
    a: Any
    b: Any
    scale: float = struct.field(pytree_node=False, default=1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    def delta(self, dtype: Any) -> Array:
        """scale * a @ b in `dtype`, shaped like the base."""
        rank = self.a.shape[-1]
        batch = self.a.ndim + self.b.ndim - self.ndim - 2  # a [*batch, *in, r], b [*batch, r, *out]
        a = self.a.reshape(*self.a.shape[:batch], -1, rank).astype(dtype)
        b = self.b.reshape(*self.b.shape[:batch], rank, -1).astype(dtype)
        return (jnp.matmul(a, b) * jnp.asarray(self.scale, dtype)).reshape(self.shape)


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeight)


def factor_shapes(name: str, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(a's shape, b's shape) of an adapter of `rank` on weight `name` of `shape`."""
    core = CORE_NDIM[name]
    batch, n_in = len(shape) - core, IN_DIMS.get(name, 1)
    return (*shape[:batch + n_in], rank), (*shape[:batch], rank, *shape[batch + n_in:])


def factor_specs(name: str, spec: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The partition specs (one entry per dimension) of a and b from the base weight's: a keeps the base's batch
    and input axes, b its batch and output axes; the rank is never split."""
    core = CORE_NDIM[name]
    batch, n_in = len(spec) - core, IN_DIMS.get(name, 1)
    return (*spec[:batch + n_in], None), (*spec[:batch], None, *spec[batch + n_in:])


def init_factors(key: Array, name: str, shape: tuple[int, ...], rank: int, dtype: Any = jnp.float32) -> tuple[Array, Array]:
    """a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform bound), b = 0."""
    a_shape, b_shape = factor_shapes(name, shape, rank)
    fan_in = int(np.prod(shape[len(shape) - CORE_NDIM[name]:][:IN_DIMS.get(name, 1)]))
    bound = 1.0 / np.sqrt(fan_in)
    return (jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype), jnp.zeros(b_shape, dtype))


def merge(w: Any) -> Any:
    """A `LoraWeight` folded into a plain array of its base's dtype (a `QuantArray` base is dequantised to
    float32 first); anything else unchanged. Map it over a tree with `is_leaf=is_lora`."""
    if not is_lora(w):
        return w
    from .quant import dequantize, is_quant

    return dequantize(w, jnp.float32).astype(jnp.float32 if is_quant(w.base) else w.base.dtype)
