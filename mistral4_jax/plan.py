"""Memory plan from abstract shapes only (nothing is allocated): weights and KV cache per device.

Per parameter, the bytes on one device are its bytes divided by the sizes of the mesh axes its
logical axes map to (`sharding.RULES`); replicated dimensions count in full. The KV cache holds
kv_lora + qk_rope numbers per token per layer, with the batch over `data`. The largest batch x context
that fits leaves `reserve` of every device for activations, compiled code and fragmentation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Mistral4Config
from .sharding import MESH_AXES, RULES, check_divisible

GiB = 1024**3
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}

ACCELERATORS = {
    # name: (chips, HBM bytes per chip, mesh for the real model)
    "TPU v5e-16": (16, 16 * GiB, {"data": 1, "expert": 8, "tensor": 2}),
    "TPU v5p-8": (4, 95 * GiB, {"data": 1, "expert": 4, "tensor": 1}),
    "TPU v6e-8": (8, 32 * GiB, {"data": 1, "expert": 8, "tensor": 1}),
    "2x H200": (2, 141 * 10**9, {"data": 1, "expert": 2, "tensor": 1}),
}
"""The hardware the README's memory table covers (HBM per chip as sold; v5p-8 = 4 chips)."""


def parse_bytes(text: str) -> int:
    """"16GiB", "80GB", "1.5 TiB", "123" -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 16GiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict[str, int]
    dtype: str
    cache_dtype: str
    params: int
    weight_bytes_total: int
    weight_bytes_per_device: int
    kv_bytes_per_token: int
    kv_bytes_per_device: int
    batch: int
    context: int
    hbm_per_device: int | None
    max_tokens_per_device: int | None  # batch x context of the KV cache that fits (after weights and reserve)
    fits: bool | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def memory_plan(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any = jnp.bfloat16, cache_dtype: Any = None,
                batch: int = 1, context: int = 8192, hbm_per_device: int | None = None, reserve: float = 0.1) -> MemoryPlan:
    """Bytes per device for weights and KV cache on a mesh of `mesh` sizes (see module docstring)."""
    from .model import abstract_params, layer_groups, param_axes

    mesh = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    abstract = abstract_params(cfg, dtype)
    axes = param_axes(cfg, dtype)
    check_divisible(abstract, axes, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    axis_leaves = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    total = per_device = count = 0
    for (path, leaf), names in zip(leaves, axis_leaves):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        split = 1
        for dim, name in zip(leaf.shape, names):
            axis = RULES.get(name) if name else None
            if axis:
                split *= mesh[axis]
        total += nbytes
        per_device += -(-nbytes // split)
        if not jax.tree_util.keystr(path).endswith("_scale']"):  # FP8 scales are not parameters
            count += math.prod(leaf.shape)
    cache_dtype = cache_dtype or (jnp.bfloat16 if jnp.dtype(dtype).itemsize < 2 else dtype)
    layers = sum(n for _, n, _ in layer_groups(cfg))
    kv_token = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(cache_dtype).itemsize
    data = mesh["data"] if batch % mesh["data"] == 0 else 1
    kv_device = batch * context * kv_token // data
    max_tokens = fits = None
    if hbm_per_device is not None:
        free = hbm_per_device * (1 - reserve) - per_device
        max_tokens = max(0, int(free // kv_token)) * data
        fits = free >= kv_device
    return MemoryPlan(mesh, jnp.dtype(dtype).name, jnp.dtype(cache_dtype).name, count, total, per_device, kv_token,
                      kv_device, batch, context, hbm_per_device, max_tokens, fits)


def format_plan(p: MemoryPlan) -> str:
    """A short human-readable summary."""
    mesh = ",".join(f"{a}={p.mesh[a]}" for a in MESH_AXES)
    lines = [
        f"mesh {mesh} · weights {p.dtype} · cache {p.cache_dtype}",
        f"parameters           {p.params / 1e9:,.2f} B ({p.weight_bytes_total / GiB:,.1f} GiB in all)",
        f"weights per device   {p.weight_bytes_per_device / GiB:,.2f} GiB",
        f"KV cache per token   {p.kv_bytes_per_token:,} bytes (all layers)",
        f"KV per device        {p.kv_bytes_per_device / GiB:,.3f} GiB for batch {p.batch} x context {p.context}",
    ]
    if p.hbm_per_device is not None:
        lines.append(f"memory per device    {p.hbm_per_device / GiB:,.1f} GiB -> "
                     + ("fits" if p.fits else "does NOT fit")
                     + f"; largest batch x context: {p.max_tokens_per_device:,} tokens")
    return "\n".join(lines)
