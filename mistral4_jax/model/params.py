"""The parameter tree, declared once: each parameter's shape, storage dtype, logical axes and initializer is
a `ParamSpec` in `param_specs`; abstract shapes, logical axes, shardings and random init all derive from it.

Tree (D hidden, X vocabulary; the layers' shapes in `_layer`): embed [X, D], final_norm {scale [D]},
lm_head [X, D] (absent with tied embeddings), and per layer group ("layers_dense", "layers_moe") the layer's
tree stacked on a leading [layers] axis: input_norm, attn, post_attn_norm, then mlp (dense) or moe.
With an FP8 `param_dtype` the weights of `FP8_WEIGHTS` are float8_e4m3fn with a float32 `<name>_scale`
beside them (per expert [E, 1, 1], else [1, ...]); everything else is bfloat16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ..config import Mistral4Config
from ..sharding import RULES, check_divisible, spec_for

Array = jax.Array


def normal_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    """normal(0, 0.02) drawn in float32, cast to dtype."""
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def ones_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    return jnp.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, storage dtype, logical axis names (one per dimension, None = never
    sharded) and initializer (key, shape, dtype) -> array."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    init: Callable[[Array, tuple[int, ...], Any], Array] = normal_init


FP8_WEIGHTS = frozenset({
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "experts_gate", "experts_up", "experts_down",
})
"""Weights stored as float8_e4m3fn when `param_dtype` is FP8 (norms, router, embedding, lm_head stay float),
except those a checkpoint lists in its `float_weights` (see `init_params`)."""


def fp8_scale_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the float32 scale stored beside FP8 weight `name`: per expert [E, 1, 1] or per tensor [1, ...]."""
    return (shape[0],) + (1,) * (len(shape) - 1) if name.startswith("experts_") else (1,) * len(shape)


def is_fp8(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.float8_e4m3fn


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


# ------------------------------------------------------------------------------------- declarations
def _weights(param_dtype: Any, **decl: tuple[tuple[int, ...], tuple[str, ...]]) -> dict[str, ParamSpec]:
    """Specs of the named weights, each (shape, axes): normal-initialised in `param_dtype`; with FP8 those of
    `FP8_WEIGHTS` get a float32 `<name>_scale` of ones, the others are bfloat16."""
    fp8 = is_fp8(param_dtype)
    out = {}
    for name, (shape, axes) in decl.items():
        if fp8 and name in FP8_WEIGHTS:
            scale = fp8_scale_shape(name, shape)
            out[name] = ParamSpec(shape, param_dtype, axes)
            out[name + "_scale"] = ParamSpec(scale, jnp.float32, tuple(a if n > 1 else None for a, n in zip(axes, scale)),
                                             ones_init)
        else:
            out[name] = ParamSpec(shape, jnp.bfloat16 if fp8 else param_dtype, axes)
    return out


def _norm(param_dtype: Any, axis: str, n: int) -> dict[str, ParamSpec]:
    return {"scale": ParamSpec((n,), jnp.bfloat16 if is_fp8(param_dtype) else param_dtype, (axis,), ones_init)}


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
        q = {**_weights(pd, q_a_proj=((d, c.q_lora_rank), ("embed", "q_lora"))), "q_a_norm": _norm(pd, "q_lora", c.q_lora_rank),
             **_weights(pd, q_b_proj=((c.q_lora_rank, n, p + r), ("q_lora", "heads", "qk_dim")))}
    else:
        q = _weights(pd, q_proj=((d, n, p + r), ("embed", "heads", "qk_dim")))
    attn = {**q, **_weights(pd, kv_a_proj=((d, lat + r), ("embed", "kv_lora_rope"))), "kv_a_norm": _norm(pd, "kv_lora", lat),
            **_weights(pd, k_b_proj=((lat, n, p), ("kv_lora", "heads", "qk_nope_dim")),
                       v_b_proj=((lat, n, v), ("kv_lora", "heads", "v_dim")), o_proj=((n, v, d), ("heads", "v_dim", "embed")))}
    layer = {"input_norm": _norm(pd, "norm", d), "attn": attn, "post_attn_norm": _norm(pd, "norm", d)}
    if not moe:
        layer["mlp"] = _mlp(pd, d, c.intermediate_size)
        return layer
    e, f = c.n_routed_experts, c.moe_intermediate_size
    router = ParamSpec((d, e), jnp.bfloat16 if is_fp8(pd) else pd, ("embed", "router_experts"))
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

    float_weights: with an FP8 `param_dtype`, the weights of `FP8_WEIGHTS` stored in bfloat16 instead, without
    a scale, as paths in the tree ("layers_moe/attn/kv_a_proj"): a converted checkpoint lists those whose
    source was not FP8 (the released checkpoint keeps `kv_a_proj_with_mqa` in bf16). Ignored for float dtypes.
    """
    vocab = ((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))  # lm_head as embed, [X, D]: XLA:CPU's
    # small-batch matmul is faster against this (HF's) layout than against [D, X]
    top = {"embed": vocab} if cfg.tie_word_embeddings else {"embed": vocab, "lm_head": vocab}
    out: dict[str, Any] = {**_weights(param_dtype, **top), "final_norm": _norm(param_dtype, "norm", cfg.hidden_size)}
    for name, n, moe in layer_groups(cfg):
        out[name] = jax.tree_util.tree_map(lambda s, n=n: ParamSpec((n, *s.shape), s.dtype, ("layers", *s.axes), s.init),
                                           _layer(cfg, param_dtype, moe), is_leaf=_is_spec)
    if is_fp8(param_dtype):
        out = _with_float_weights(out, float_weights, lambda w, _: dataclasses.replace(w, dtype=jnp.bfloat16))
    return out


# ---------------------------------------------------------------------------------------- derived
def param_axes(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Logical axis names of every parameter (a tree of tuples matching `abstract_params`)."""
    return jax.tree_util.tree_map(lambda s: s.axes, param_specs(cfg, param_dtype, float_weights), is_leaf=_is_spec)


def abstract_params(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)),
                                  param_specs(cfg, param_dtype, float_weights), is_leaf=_is_spec)


def init_params(cfg: Mistral4Config, key: Array, param_dtype: Any = jnp.float32,
                float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Random parameters (normal(0.02) weights, unit norms and FP8 scales); `param_specs`' tree."""
    specs, treedef = jax.tree_util.tree_flatten(param_specs(cfg, param_dtype, float_weights), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))
    return jax.tree_util.tree_unflatten(treedef, [s.init(k, s.shape, s.dtype) for s, k in zip(specs, keys)])


def param_shardings(cfg: Mistral4Config, mesh: Mesh, param_dtype: Any = jnp.float32,
                    rules: dict[str, str | None] = RULES, float_weights: Sequence[str] = ()) -> Any:
    """NamedSharding for every parameter (FP8 `float_weights` as `param_specs`); checks first that each
    sharded dimension divides evenly."""
    axes = param_axes(cfg, param_dtype, float_weights)
    check_divisible(abstract_params(cfg, param_dtype, float_weights), axes, dict(mesh.shape), rules)
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, spec_for(a, rules)), axes,
                                  is_leaf=lambda x: isinstance(x, tuple))


# -------------------------------------------------------------------------------- stored trees
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
