"""Quantised weights as a typed pytree: `QuantArray` (values + scale) and the one place they are dequantised.

FP8 (float8_e4m3fn values, float32 scale per tensor [1, ...] or per expert [E, 1, ...]) is the format today;
int8 would be another `QUANT_DTYPES` entry with the same arithmetic, float(values) * scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

FP8_DTYPE_NAMES = ("float8_e4m3fn", "float8_e5m2")
"""Names of the FP8 dtypes (a source checkpoint may hold either; the model stores float8_e4m3fn)."""

QUANT_DTYPES = ("float8_e4m3fn",)
"""Storage dtypes of `QuantArray` values (a model `param_dtype` among them means: quantised weights)."""


def is_fp8(dtype: Any) -> bool:
    """Whether `dtype` (a dtype or its name) is one of the FP8 dtypes."""
    return np.dtype(dtype).name in FP8_DTYPE_NAMES


def is_quantized(dtype: Any) -> bool:
    """Whether a model `param_dtype` stores its linear weights as `QuantArray`s."""
    return np.dtype(dtype).name in QUANT_DTYPES


@struct.dataclass
class QuantArray:
    """A quantised weight: `values` [*shape] in a `QUANT_DTYPES` dtype and float32 `scale` broadcastable to it
    (per tensor [1, ...], per expert [E, 1, ...]); the weight is float(values) * scale. A pytree of two leaves,
    so tree maps (slicing, sharding, `ShapeDtypeStruct`s) apply to both."""

    values: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.values.shape)


def scale_shape(shape: tuple[int, ...], per_expert: bool) -> tuple[int, ...]:
    """Shape of the scale of a weight of `shape`: per expert [E, 1, ...] or per tensor [1, ...]."""
    return (shape[0],) + (1,) * (len(shape) - 1) if per_expert else (1,) * len(shape)


def is_quant(x: Any) -> bool:
    return isinstance(x, QuantArray)


def dequantize(w: Array | QuantArray, dtype: Any) -> Array:
    """w in `dtype`: a plain array cast, a `QuantArray` float(values) * scale computed in `dtype`, a
    `lora.LoraWeight` its base plus its low-rank update."""
    from .lora import LoraWeight

    if isinstance(w, LoraWeight):
        return dequantize(w.base, dtype) + w.delta(dtype)
    if isinstance(w, QuantArray):
        return w.values.astype(dtype) * w.scale.astype(dtype)
    return w.astype(dtype)


def qeinsum(subscripts: str, x: Array, w: Array | QuantArray) -> Array:
    """`jnp.einsum(subscripts, x, w)` with w (plain or `QuantArray`) read in x's dtype.

    A per-tensor scale multiplies the (small) result rather than every weight element: the FP8 values go
    straight into the matmul (on v5e-16 the compiled decode step moves the same HBM bytes either way)."""
    if isinstance(w, QuantArray) and w.scale.size == 1:
        return jnp.einsum(subscripts, x, w.values.astype(x.dtype)) * w.scale.reshape(()).astype(x.dtype)
    return jnp.einsum(subscripts, x, dequantize(w, x.dtype))
