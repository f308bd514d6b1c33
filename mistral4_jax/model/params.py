"""The parameter tree: layer groups stacked [layers, ...], its logical axes, random init, abstract shapes
and shardings."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import Mistral4Config
from ..sharding import RULES, check_divisible, spec_for
from .layers import FP8_WEIGHTS, DecoderLayer, is_fp8

Array = jax.Array


def layer_groups(cfg: Mistral4Config) -> list[tuple[str, int, bool]]:
    """(name, number of layers, is_moe) of each stacked layer group, in order."""
    groups = [("layers_dense", cfg.first_k_dense_replace, False), ("layers_moe", cfg.num_moe_layers, True)]
    return [g for g in groups if g[1] > 0]


def _init_layer_boxed(cfg: Mistral4Config, moe: bool, param_dtype: Any, key: Array) -> Any:
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    cs = jnp.zeros((1, 1, cfg.qk_rope_head_dim // 2), jnp.float32)
    return DecoderLayer(cfg, param_dtype=param_dtype, moe=moe).init(key, x, cs, cs, jnp.ones((1, 1)), jnp.ones((1, 1, 1), bool))["params"]


def _top_level_specs(cfg: Mistral4Config, param_dtype: Any) -> dict[str, tuple[tuple[int, ...], Any, tuple[str, ...]]]:
    float_dtype = jnp.bfloat16 if is_fp8(param_dtype) else param_dtype
    specs = {
        "embed": ((cfg.vocab_size, cfg.hidden_size), float_dtype, ("vocab", "embed")),
        "final_norm": ((cfg.hidden_size,), float_dtype, ("norm",)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((cfg.vocab_size, cfg.hidden_size), float_dtype, ("vocab", "embed"))  # as embed: [X, D]
    return specs


def param_axes(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Logical axis names of every parameter (a tree of tuples matching `abstract_params`)."""
    out: dict[str, Any] = {}
    for name, (_, _, axes) in _top_level_specs(cfg, param_dtype).items():
        out[name] = {"scale": axes} if name == "final_norm" else axes
    for name, _, moe in layer_groups(cfg):
        boxed = jax.eval_shape(functools.partial(_init_layer_boxed, cfg, moe, param_dtype), jax.random.key(0))
        specs = nn.get_partition_spec(boxed)
        out[name] = jax.tree_util.tree_map(lambda s: ("layers", *s), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    if is_fp8(param_dtype):
        out = _with_float_weights(out, float_weights, lambda axes, _: axes)
    return out


def init_params(cfg: Mistral4Config, key: Array, param_dtype: Any = jnp.float32,
                float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Random parameters (normal(0.02) weights, unit norms); layers stacked [layers, ...].

    float_weights: with an FP8 `param_dtype`, the weights of `FP8_WEIGHTS` stored in bfloat16 instead, without
    a scale, as paths in the tree ("layers_moe/attn/kv_a_proj"): a converted checkpoint lists those whose
    source was not FP8 (the released checkpoint keeps `kv_a_proj_with_mqa` in bf16). Ignored for float dtypes.
    """
    keys = jax.random.split(key, 8)
    out: dict[str, Any] = {}
    for i, (name, (shape, dtype, _)) in enumerate(_top_level_specs(cfg, param_dtype).items()):
        if name == "final_norm":
            out[name] = {"scale": jnp.ones(shape, dtype)}
        else:
            out[name] = (0.02 * jax.random.normal(keys[i], shape, jnp.float32)).astype(dtype)
    for j, (name, n, moe) in enumerate(layer_groups(cfg)):
        layer_keys = jax.random.split(keys[4 + j], n)
        out[name] = nn.unbox(jax.vmap(functools.partial(_init_layer_boxed, cfg, moe, param_dtype))(layer_keys))
    if is_fp8(param_dtype):
        out = _with_float_weights(out, float_weights, lambda w, s: (w.astype(jnp.float32) * s).astype(jnp.bfloat16))
    return out


def abstract_params(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_params, cfg, param_dtype=param_dtype, float_weights=tuple(float_weights)),
                          jax.random.key(0))


def _with_float_weights(tree: dict[str, Any], float_weights: Sequence[str], fn: Any) -> dict[str, Any]:
    """`tree` (parameters, or a tree matching them) with each FP8 weight at a `float_weights` path replaced by
    fn(weight, scale) and its `_scale` dropped (dicts copied, leaves shared). ValueError for a path that is
    not an FP8 weight of the tree."""
    copy = lambda t: {k: copy(v) for k, v in t.items()} if isinstance(t, dict) else t  # noqa: E731
    tree = copy(tree)
    for path in float_weights:
        *parents, name = path.split("/")
        node: Any = tree
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if name not in FP8_WEIGHTS or not isinstance(node, dict) or name + "_scale" not in node:
            raise ValueError(f"float_weights: {path!r} is not an FP8 weight of this model")
        node[name] = fn(node[name], node.pop(name + "_scale"))
    return tree


def stored_float_weights(params: dict[str, Any]) -> tuple[str, ...]:
    """The `float_weights` of a stacked parameter tree (arrays or `ShapeDtypeStruct`s): the paths of the
    `FP8_WEIGHTS` stored without a `_scale` beside them, if the tree holds FP8 weights at all, else ()."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if not any(is_fp8(x.dtype) for x in flat.values()):
        return ()
    return tuple(sorted(p for p in flat if p.rsplit("/", 1)[-1] in FP8_WEIGHTS and p + "_scale" not in flat))


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Layer groups as lists of per-layer trees (for `layer_loop="unroll"`); other entries unchanged."""
    out = dict(params)
    for name in ("layers_dense", "layers_moe"):
        if name in params and not isinstance(params[name], list):
            n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
            out[name] = [jax.tree_util.tree_map(lambda x, i=i: x[i], params[name]) for i in range(n)]
    return out


def _tree_of_specs(axes_tree: Any, rules: dict[str, str | None]) -> Any:
    return jax.tree_util.tree_map(lambda a: spec_for(a, rules), axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: Mistral4Config, mesh: Mesh, param_dtype: Any = jnp.float32,
                    rules: dict[str, str | None] = RULES, float_weights: Sequence[str] = ()) -> Any:
    """NamedSharding for every parameter (FP8 `float_weights` as `init_params`); checks first that each
    sharded dimension divides evenly."""
    axes = param_axes(cfg, param_dtype, float_weights)
    check_divisible(abstract_params(cfg, param_dtype, float_weights), axes, dict(mesh.shape), rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), _tree_of_specs(axes, rules),
                                  is_leaf=lambda x: isinstance(x, P))
