"""Meshes and the logical-axis rules (`ShardingRules`, `DEFAULT_RULES`).

Every parameter and cache array carries logical axis names (`model.param_axes`, `model.CACHE_AXES`).
A `ShardingRules` value maps each logical name onto a mesh axis of the ("data", "expert", "tensor")
mesh; the model carries one (`Mistral4(..., rules=)`, default `DEFAULT_RULES`) and passes it to every
parameter, cache, batch and shard_map layout, so another value is all it takes to try another layout.
jit propagates shardings everywhere except the routed experts, which run under `shard_map`
(`model.moe.sharded_routed_experts`).

Layout: experts over `expert` and their hidden dimension over `tensor`; attention heads, the shared
expert, dense MLPs and the vocabulary over `tensor`; the batch (and the KV cache's batch) over `data`; the KV
cache's slots over `expert` (attention is replicated there: each chip holds and reads 1/expert of a long
context, `model.attention.latent_attention`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Mistral4Config

MESH_AXES = ("data", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None = replicated): a frozen, hashable value (a static argument of jit).

    `ShardingRules({"batch": "data", ...})` or from (logical, mesh axis) pairs; logical names it does not
    list are replicated. `DEFAULT_RULES.replace(heads=None)` is another layout.
    """

    table: tuple[tuple[str, str | None], ...]

    def __post_init__(self) -> None:
        pairs = tuple(dict(self.table).items())
        for name, axis in pairs:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding rules: {name!r} maps to unknown mesh axis {axis!r}; axes are {', '.join(MESH_AXES)}")
        object.__setattr__(self, "table", pairs)
        object.__setattr__(self, "_axes", dict(pairs))

    def get(self, name: str | None) -> str | None:
        """The mesh axis of logical axis `name` (None for None, an unlisted name, or a replicated one)."""
        return self._axes.get(name) if name is not None else None

    def spec(self, axes: Sequence[str | None], what: str = "array") -> P:
        """PartitionSpec of an array (`what` names it in errors) whose dims carry logical names `axes`;
        ValueError if two of them map to one mesh axis."""
        mesh_axes = [self.get(a) for a in axes]
        for i, axis in enumerate(mesh_axes):
            if axis is not None and axis in mesh_axes[:i]:
                first = axes[mesh_axes.index(axis)]
                raise ValueError(f"colliding mesh axis {axis!r}: logical axes {first!r} and {axes[i]!r} of {what}")
        return P(*mesh_axes)

    def replace(self, **changes: str | None) -> ShardingRules:
        """These rules with `changes` (logical axis=mesh axis or None) applied; new logical names are added."""
        return ShardingRules({**self._axes, **changes})


DEFAULT_RULES = ShardingRules({
    # activations and cache
    "batch": "data",
    "cache_batch": "data",
    "cache_seq": "expert",
    # parameters
    "layers": None,
    "embed": None,
    "norm": None,
    "vocab": "tensor",
    "heads": "tensor",
    "q_lora": None,
    "kv_lora": None,
    "kv_lora_rope": None,
    "qk_dim": None,
    "qk_nope_dim": None,
    "v_dim": None,
    "rope_dim": None,
    "mlp": "tensor",
    "router_experts": None,
    "experts": "expert",
    "expert_mlp": "tensor",
})
"""Today's layout (module docstring): experts over `expert`, tensor parallelism over `tensor`, the batch over `data`,
the cache's slots over `expert`."""


def parse_mesh(spec: str | dict[str, int], num_devices: int | None = None) -> dict[str, int]:
    """"data=1,expert=4,tensor=2" (one axis may be -1 = the rest; omitted axes are 1) -> sizes per axis.

    num_devices: the devices the mesh must cover; None = this system's devices if an axis is -1, else
    whatever the sizes multiply to (for planning other hardware).
    """
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES:
                raise ValueError(f"--mesh: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
            if name in sizes:
                raise ValueError(f"--mesh: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
    else:
        sizes = dict(spec)
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"--mesh: only one axis may be -1, got {', '.join(rest)}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"--mesh: axis sizes must be positive (or one -1), got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    n = num_devices if num_devices is not None else (jax.device_count() if rest else known)
    if rest:
        if n % known:
            raise ValueError(f"--mesh: {known} devices in the fixed axes do not divide the {n} devices")
        sizes[rest[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(f"--mesh: {sizes} uses {math.prod(sizes.values())} devices, but there are {n}")
    return sizes


def mesh_platform(mesh: Mesh | None) -> str:
    """The platform ("cpu", "tpu", "gpu") of a mesh's devices, else of JAX's default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def make_mesh(spec: str | dict[str, int] = "data=-1", devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "expert", "tensor") mesh over `devices` (default: all devices, every host)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.sharding import AxisType

        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except (ImportError, TypeError):  # older jax
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def check_divisible(abstract: Any, axes: Any, mesh: dict[str, int], rules: ShardingRules = DEFAULT_RULES) -> None:
    """ValueError naming the parameter and axis when a mesh axis does not divide the dimension it shards."""
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(abstract))
    for path, names in flat_axes:
        key = jax.tree_util.keystr(path)
        shape = flat[key].shape
        for dim, name in zip(shape, names):
            mesh_axis = rules.get(name)
            if mesh_axis and dim % mesh[mesh_axis]:
                raise ValueError(
                    f"parameter {key}: its {name!r} dimension ({dim}) is not divisible by mesh axis "
                    f"{mesh_axis}={mesh[mesh_axis]}"
                )


def path_name(keys: tuple) -> str:
    """"layers_moe/attn/q_b_proj" of a pytree key path."""
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def tree_shardings(mesh: Mesh, axes: Any, rules: ShardingRules = DEFAULT_RULES, prefix: str = "") -> Any:
    """A NamedSharding by `rules` for every leaf of a tree of logical-axis tuples (errors name the leaf by
    `prefix` + its path)."""
    return jax.tree_util.tree_map_with_path(lambda k, a: NamedSharding(mesh, rules.spec(a, prefix + path_name(k))),
                                            axes, is_leaf=lambda x: isinstance(x, tuple))


def batch_spec(mesh: Mesh, batch: int, ndim: int, rules: ShardingRules = DEFAULT_RULES) -> P:
    """A spec for a [B, ...] activation: the batch over `rules`' "batch" mesh axis when it divides, else replicated."""
    axis = rules.get("batch")
    return P(axis if axis and batch % mesh.shape[axis] == 0 else None, *([None] * (ndim - 1)))
