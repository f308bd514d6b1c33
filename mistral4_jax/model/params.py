"""The parameter tree, declared once: each parameter's shape, storage dtype, logical axes and initializer is
a `ParamSpec` in `param_specs`; abstract shapes, logical axes, shardings and random init all derive from it.

Tree (D hidden, X vocabulary; the layers' shapes in `_layer`): embed [X, D], final_norm {scale [D]},
lm_head [X, D] (absent with tied embeddings), and per layer group ("layers_dense", "layers_moe") the layer's
tree stacked on a leading [layers] axis: input_norm, attn, post_attn_norm, then mlp (dense) or moe.
With a quantised `param_dtype` (float8_e4m3fn) the linear weights (`_weights`) are `QuantArray`s (values and a
float32 scale, per expert [E, 1, 1] or per tensor [1, ...]); everything else is bfloat16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules, check_divisible, path_name, tree_shardings
from ..weights.quant import QUANT_DTYPES, QuantArray, is_quant, is_quantized, scale_shape

Array = jax.Array


def normal_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    """normal(0, 0.02) drawn in float32, cast to dtype."""
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def ones_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    return jnp.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, storage dtype, logical axis names (one per dimension, None = never
    sharded) and initializer (key, shape, dtype) -> array. `scale`: for a quantised weight (a `QuantArray`
    of `dtype` values), the shape of its float32 scale (initialised to ones; sharded like the weight on
    the dimensions it keeps); None for a plain array."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    init: Callable[[Array, tuple[int, ...], Any], Array] = normal_init
    scale: tuple[int, ...] | None = None

    def abstract(self) -> Any:
        """`jax.ShapeDtypeStruct` (a `QuantArray` of two for a quantised weight)."""
        values = jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))
        return values if self.scale is None else QuantArray(values, jax.ShapeDtypeStruct(self.scale, jnp.dtype(jnp.float32)))

    def logical_axes(self) -> Any:
        """The axes (a `QuantArray` of the weight's and the scale's for a quantised weight)."""
        if self.scale is None:
            return self.axes
        return QuantArray(self.axes, tuple(a if n > 1 else None for a, n in zip(self.axes, self.scale)))

    def initialize(self, key: Array) -> Any:
        values = self.init(key, self.shape, self.dtype)
        return values if self.scale is None else QuantArray(values, jnp.ones(self.scale, jnp.float32))

    def stacked(self, n: int) -> ParamSpec:
        """This parameter for n stacked layers: a leading [layers] dimension."""
        scale = None if self.scale is None else (n, *self.scale)
        return dataclasses.replace(self, shape=(n, *self.shape), axes=("layers", *self.axes), scale=scale)


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


# ------------------------------------------------------------------------------------- declarations
def _float(param_dtype: Any) -> Any:
    """Storage dtype of the parameters that are never quantised: bfloat16 beside quantised weights."""
    return jnp.bfloat16 if is_quantized(param_dtype) else param_dtype


def _weights(param_dtype: Any, **decl: tuple[tuple[int, ...], tuple[str, ...]]) -> dict[str, ParamSpec]:
    """Specs of the named linear weights, each (shape, axes), normal-initialised: `QuantArray`s with a quantised
    `param_dtype` (scale per expert [E, 1, 1] for the stacked experts, whose first axis is "experts", else per
    tensor [1, ...]), else plain arrays of `param_dtype`."""
    if not is_quantized(param_dtype):
        return {name: ParamSpec(shape, param_dtype, axes) for name, (shape, axes) in decl.items()}
    return {name: ParamSpec(shape, param_dtype, axes, scale=scale_shape(shape, per_expert=axes[0] == "experts"))
            for name, (shape, axes) in decl.items()}


def _norm(param_dtype: Any, axis: str, n: int) -> dict[str, ParamSpec]:
    return {"scale": ParamSpec((n,), _float(param_dtype), (axis,), ones_init)}


def _mlp(param_dtype: Any, d: int, width: int) -> dict[str, ParamSpec]:
    """Gated MLP (`layers.mlp`): gate/up [D, I], down [I, D]."""
    return _weights(param_dtype, gate_proj=((d, width), ("embed", "mlp")), up_proj=((d, width), ("embed", "mlp")),
                    down_proj=((width, d), ("mlp", "embed")))


def _layer(cfg: Mistral4Config, param_dtype: Any, moe: bool) -> dict[str, Any]:
    """One decoder layer (`layers.decoder_layer`). Attention: q_a [D, Q] + q_a_norm [Q] + q_b [Q, N, H]
    (or q_proj [D, N, H] without q_lora), kv_a [D, L + R] + kv_a_norm [L], k_b [L, N, P], v_b [L, N, V],
    o [N, V, D]. MoE: router [D, E], experts gate/up [E, D, F], down [E, F, D], a shared expert MLP."""
    c, pd = cfg, param_dtype
    d, n, p, r, v, lat = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    if c.q_lora_rank:
        attn = _weights(pd, q_a_proj=((d, c.q_lora_rank), ("embed", "q_lora")),
                        q_b_proj=((c.q_lora_rank, n, p + r), ("q_lora", "heads", "qk_dim")))
        attn["q_a_norm"] = _norm(pd, "q_lora", c.q_lora_rank)
    else:
        attn = _weights(pd, q_proj=((d, n, p + r), ("embed", "heads", "qk_dim")))
    attn |= _weights(pd, kv_a_proj=((d, lat + r), ("embed", "kv_lora_rope")),
                     k_b_proj=((lat, n, p), ("kv_lora", "heads", "qk_nope_dim")),
                     v_b_proj=((lat, n, v), ("kv_lora", "heads", "v_dim")),
                     o_proj=((n, v, d), ("heads", "v_dim", "embed")))
    attn["kv_a_norm"] = _norm(pd, "kv_lora", lat)
    layer = {"input_norm": _norm(pd, "norm", d), "attn": attn, "post_attn_norm": _norm(pd, "norm", d)}
    if not moe:
        layer["mlp"] = _mlp(pd, d, c.intermediate_size)
        return layer
    e, f = c.n_routed_experts, c.moe_intermediate_size
    router = ParamSpec((d, e), _float(pd), ("embed", "router_experts"))
    layer["moe"] = {"router": router, **_weights(pd, experts_gate=((e, d, f), ("experts", "embed", "expert_mlp")),
                                                 experts_up=((e, d, f), ("experts", "embed", "expert_mlp")),
                                                 experts_down=((e, f, d), ("experts", "expert_mlp", "embed"))),
                    "shared_expert": _mlp(pd, d, c.shared_intermediate_size)}
    return layer


def layer_groups(cfg: Mistral4Config) -> list[tuple[str, int, bool]]:
    """(name, number of layers, is_moe) of each stacked layer group, in order."""
    groups = [("layers_dense", cfg.first_k_dense_replace, False), ("layers_moe", cfg.num_moe_layers, True)]
    return [g for g in groups if g[1] > 0]


def param_specs(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """The `ParamSpec` of every parameter, layer groups stacked [layers, ...].

    float_weights: with a quantised `param_dtype`, the linear weights stored as plain bfloat16 instead, as
    paths in the tree ("layers_moe/attn/kv_a_proj"): a converted checkpoint lists those whose
    source was not FP8 (the released checkpoint keeps `kv_a_proj_with_mqa` in bf16). Ignored for float dtypes.
    """
    vocab = ParamSpec((cfg.vocab_size, cfg.hidden_size), _float(param_dtype), ("vocab", "embed"))  # lm_head as
    # embed, [X, D]: XLA:CPU's small-batch matmul is faster against this (HF's) layout than against [D, X]
    out: dict[str, Any] = {"embed": vocab, "final_norm": _norm(param_dtype, "norm", cfg.hidden_size)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = vocab
    for name, n, moe in layer_groups(cfg):
        out[name] = jax.tree_util.tree_map(lambda s, n=n: s.stacked(n), _layer(cfg, param_dtype, moe), is_leaf=_is_spec)
    for path in float_weights if is_quantized(param_dtype) else ():
        *parents, name = path.split("/")
        node: Any = out
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not _is_spec(node.get(name)) or node[name].scale is None:
            raise ValueError(f"float_weights: {path!r} is not an FP8 weight of this model")
        node[name] = dataclasses.replace(node[name], dtype=jnp.bfloat16, scale=None)
    return out


# ---------------------------------------------------------------------------------------- derived
def param_axes(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Logical axis names of every parameter (a tree of tuples matching `abstract_params`)."""
    return jax.tree_util.tree_map(ParamSpec.logical_axes, param_specs(cfg, param_dtype, float_weights), is_leaf=_is_spec)


def abstract_params(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.tree_util.tree_map(ParamSpec.abstract, param_specs(cfg, param_dtype, float_weights), is_leaf=_is_spec)


def init_params(cfg: Mistral4Config, key: Array, param_dtype: Any = jnp.float32,
                float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Random parameters (normal(0.02) weights, unit norms and FP8 scales); `param_specs`' tree."""
    specs, treedef = jax.tree_util.tree_flatten(param_specs(cfg, param_dtype, float_weights), is_leaf=_is_spec)

    def init(key: Array) -> list[Any]:  # one compiled program, not one per parameter shape
        return [s.initialize(k) for s, k in zip(specs, jax.random.split(key, len(specs)))]

    return jax.tree_util.tree_unflatten(treedef, jax.jit(init)(key))


def param_shardings(cfg: Mistral4Config, mesh: Mesh, param_dtype: Any = jnp.float32,
                    rules: ShardingRules = DEFAULT_RULES, float_weights: Sequence[str] = ()) -> Any:
    """NamedSharding for every parameter by `rules` (FP8 `float_weights` as `param_specs`); checks first that
    each sharded dimension divides evenly and that no array has two logical axes on one mesh axis."""
    axes = param_axes(cfg, param_dtype, float_weights)
    check_divisible(abstract_params(cfg, param_dtype, float_weights), axes, dict(mesh.shape), rules)
    return tree_shardings(mesh, axes, rules)


# -------------------------------------------------------------------------------- stored trees
def quantized_paths(cfg: Mistral4Config) -> list[str]:
    """Paths ("layers_moe/attn/kv_a_proj") of the weights that a quantised `param_dtype` stores as `QuantArray`s."""
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg, QUANT_DTYPES[0]), is_leaf=_is_spec)[0]
    return [path_name(keys) for keys, spec in flat if spec.scale is not None]


def stored_float_weights(cfg: Mistral4Config, params: dict[str, Any]) -> tuple[str, ...]:
    """The `float_weights` of a stacked parameter tree (arrays or `ShapeDtypeStruct`s): the `quantized_paths`
    that `params` holds as plain arrays, if it holds any `QuantArray` at all, else ()."""
    held = {path_name(keys): x for keys, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quant)[0]}
    if not any(is_quant(x) for x in held.values()):
        return ()
    return tuple(sorted(p for p in quantized_paths(cfg) if not is_quant(held.get(p))))


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Layer groups as lists of per-layer trees (for `layer_loop="unroll"`); other entries unchanged."""
    out = dict(params)
    for name in ("layers_dense", "layers_moe"):
        if name in params and not isinstance(params[name], list):
            n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
            out[name] = [jax.tree_util.tree_map(lambda x, i=i: x[i], params[name]) for i in range(n)]
    return out
