"""Meshes, the logical-axis rules table, and the expert-parallel MoE.

Every parameter and cache array carries logical axis names (`model.param_axes`, `model.CACHE_AXES`).
`RULES` maps each logical name onto a mesh axis of the ("data", "expert", "tensor") mesh; changing
that one table is all it takes to try another layout. jit propagates shardings everywhere except the
routed experts, which run under `shard_map` (`sharded_routed_experts`).

Layout: experts over `expert` and their hidden dimension over `tensor`; attention heads, the shared
expert, dense MLPs and the vocabulary over `tensor`; the batch (and the KV cache's batch) over `data`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Mistral4Config

MESH_AXES = ("data", "expert", "tensor")

RULES: dict[str, str | None] = {
    # activations and cache
    "batch": "data",
    "cache_batch": "data",
    "cache_seq": None,
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
}
"""Logical axis -> mesh axis (None = replicated). The one table that decides the layout."""


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


def spec_for(axes: Sequence[str | None], rules: dict[str, str | None] = RULES) -> P:
    """PartitionSpec of an array whose dims carry logical names `axes`."""
    return P(*(rules.get(a) if a is not None else None for a in axes))


def _tree_of_specs(axes_tree: Any, rules: dict[str, str | None]) -> Any:
    return jax.tree_util.tree_map(lambda a: spec_for(a, rules), axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: Mistral4Config, mesh: Mesh, param_dtype: Any = jnp.float32,
                    rules: dict[str, str | None] = RULES, float_weights: Sequence[str] = ()) -> Any:
    """NamedSharding for every parameter (FP8 `float_weights` as `model.init_params`); checks first that each
    sharded dimension divides evenly."""
    from .model import abstract_params, param_axes

    axes = param_axes(cfg, param_dtype, float_weights)
    check_divisible(abstract_params(cfg, param_dtype, float_weights), axes, dict(mesh.shape), rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), _tree_of_specs(axes, rules),
                                  is_leaf=lambda x: isinstance(x, P))


def check_divisible(abstract: Any, axes: Any, mesh: dict[str, int], rules: dict[str, str | None] = RULES) -> None:
    """ValueError naming the parameter and axis when a mesh axis does not divide the dimension it shards."""
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(abstract))
    for path, names in flat_axes:
        key = jax.tree_util.keystr(path)
        shape = flat[key].shape
        for dim, name in zip(shape, names):
            mesh_axis = rules.get(name) if name else None
            if mesh_axis and dim % mesh[mesh_axis]:
                raise ValueError(
                    f"parameter {key}: its {name!r} dimension ({dim}) is not divisible by mesh axis "
                    f"{mesh_axis}={mesh[mesh_axis]}"
                )


def cache_shardings(mesh: Mesh, cache: dict[str, Any], rules: dict[str, str | None] = RULES) -> Any:
    """NamedSharding for a cache from `model.init_cache` (batch over `data` when it divides)."""
    from .model import CACHE_AXES

    def fit(axes: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        spec = [rules.get(a) for a in axes]
        spec = [s if s is None or d % mesh.shape[s] == 0 else None for s, d in zip(spec, shape)]
        return NamedSharding(mesh, P(*spec))

    out = {"valid": fit(CACHE_AXES["valid"], cache["valid"].shape)}
    for name, pair in cache.items():
        if name != "valid":
            out[name] = (fit(CACHE_AXES["latent"], pair[0].shape), fit(CACHE_AXES["k_rope"], pair[1].shape))
    return out


def batch_spec(mesh: Mesh, batch: int, ndim: int) -> P:
    """Batch over `data` when it divides, else replicated: a spec for a [B, ...] activation."""
    axis = RULES["batch"]
    return P(axis if axis and batch % mesh.shape[axis] == 0 else None, *([None] * (ndim - 1)))


EXPERT_ROWS_SLACK = 1.25
"""Grouped matmuls on an expert shard take this times its even share of the token copies per call."""


def sharded_routed_experts(mesh: Mesh, x: jax.Array, ids: jax.Array, weights: jax.Array,
                           gate: jax.Array, up: jax.Array, down: jax.Array, scales: Any = None,
                           act: Any = jax.nn.silu, backend: str = "loop") -> jax.Array:
    """Expert-parallel `model.routed_experts` under `shard_map`: x [T, D] -> [T, D].

    Each (expert, tensor) shard holds E/expert experts with F/tensor of their hidden units and computes
    them for every token routed to them (tokens are replicated across `expert` and `tensor`, split over
    `data`); one `psum` over ("expert", "tensor") adds the partial outputs. We chose psum over an
    all-to-all dispatch: it needs no capacity or token reordering across devices, drops nothing, and
    at the batch sizes of inference (decode: B tokens per step) the all-reduce of a [T, D] activation
    per layer costs less than moving the expert weights; an all-to-all pays off for large prefill
    batches on many expert shards.

    `backend` is `routed_experts`' kernel. With "ragged" and more token copies than experts per shard,
    each shard's grouped matmuls take `EXPERT_ROWS_SLACK` x its even share (T*K / expert shards) of
    the copies per call, looping in the rare case that more were routed to it.
    """
    from .model import routed_experts

    ep = mesh.shape["expert"]
    local = gate.shape[0] // ep
    tok = RULES["batch"] if x.shape[0] % mesh.shape["data"] == 0 else None
    e_ax, f_ax = RULES["experts"], RULES["expert_mlp"]

    manual = tuple(a for a in (e_ax, f_ax) if a)
    t_local = x.shape[0] // (mesh.shape[tok] if tok else 1)
    rows = -(-int(t_local * ids.shape[1] * EXPERT_ROWS_SLACK) // ep // 8) * 8

    def body(x, ids, weights, gate, up, down, scales):
        # tokens are the same on every expert/tensor shard; mark them as varying there so that values
        # mixing tokens and local weights (e.g. the expert loop and its lax.switch) have one type
        x, ids, weights = (_vary(a, manual) for a in (x, ids, weights))
        first = jax.lax.axis_index(e_ax) * local if e_ax else 0
        y = routed_experts(x, ids, weights, gate, up, down, first_expert=first, scales=scales, act=act, backend=backend,
                           rows=rows)
        return jax.lax.psum(y, manual)

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # jax < 0.6
        from jax.experimental.shard_map import shard_map
    return shard_map(
        body,
        mesh=mesh,
        in_specs=(P(tok, None), P(tok, None), P(tok, None), P(e_ax, None, f_ax), P(e_ax, None, f_ax),
                  P(e_ax, f_ax, None), None if scales is None else tuple(None if s is None else P(e_ax, None, None) for s in scales)),
        out_specs=P(tok, None),
    )(x, ids, weights, gate, up, down, scales)


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark a shard_map value as varying over `axes` (a no-op on jax versions without varying types)."""
    if not axes:
        return x
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(x, axes)
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return x
