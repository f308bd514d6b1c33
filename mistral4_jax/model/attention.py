"""Attention over keys block by block (online softmax), the latent cache's absorbed attention, and writes into
the cache, with the cache's slots split over a mesh axis (`rules`' "cache_seq") for long context.

A `Partial` is an unnormalised softmax over some keys: (running max [B, N, T], sum [B, N, T], values
[B, T, N, C]), float32. Partials over disjoint key sets merge exactly (`merge`), also across the shards of a
mesh axis (`combine_over`): the decode analogue of flash attention. `normalise` turns one into [B, T, N, C].

Einsum letters as in `layers`: B batch, T query tokens, S key slots, N heads, L kv_lora rank, R rope dims.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ..sharding import DEFAULT_RULES, ShardingRules
from .cache import LayerCache

Array = jax.Array
Partial = tuple[Array, Array, Array]
NEG_INF = -1e30


def attend_partial(scores_fn: Callable[..., Array], values_fn: Callable[..., Array], keys: tuple[Array, ...],
                   key_valid: Array, q_slot: Array, scale: Array, dtype: Any, block: int,
                   offset: Array | int = 0, limit: Array | None = None) -> Partial:
    """The softmax `Partial` of T queries over S keys, `block` keys at a time.

    keys: arrays [B, S, ...], cut along S; for a block of S' keys scores_fn(*keys) -> scores [B, N, T, S'] and
    values_fn(probs [B, N, T, S'] (dtype), *keys) -> [B, T, N, C]. Key s sits at slot `offset + s` and is
    visible to query t where key_valid[b, s], its slot <= q_slot[t] (causal by slot; q_slot [T] int) and
    its slot < `limit` (None: no limit). scale [B, 1, T, 1] multiplies the float32 scores.
    S <= block or T = 1 (a decode step: scores only [B, N, 1, S]): one block. Otherwise a loop over key blocks
    whose temporaries are [B, N, T, block], never [B, N, T, S]: `lax.scan` over all blocks (differentiable)
    without `limit`, and with it a while loop over only the blocks below `limit` (a prompt chunk written
    early into a long cache does not read the empty slots after it). The last block is slid back to end at S
    (dynamic_slice clamps its start) and its already-seen keys masked: nothing is padded or copied.
    """
    s, t = key_valid.shape[1], q_slot.shape[0]

    def block_partial(start: Array | int, first: Array | int, size: int) -> Partial:
        ks = [jax.lax.dynamic_slice_in_dim(k, start, size, axis=1) for k in keys]
        slot = offset + start + jnp.arange(size)  # [S']
        ok = jax.lax.dynamic_slice_in_dim(key_valid, start, size, axis=1) & (start + jnp.arange(size) >= first)
        if limit is not None:
            ok = ok & (slot < limit)
        ok = ok[:, None, :] & (slot[None, :] <= q_slot[:, None])  # [B, T, S']
        scores = jnp.where(ok[:, None], scores_fn(*ks).astype(jnp.float32) * scale, NEG_INF)
        top = scores.max(-1)
        probs = jnp.exp(scores - top[..., None])
        return top, probs.sum(-1), values_fn(probs.astype(dtype), *ks).astype(jnp.float32)

    if t == 1 or s <= block:
        return block_partial(0, 0, s)

    def step(i: Array, carry: Partial) -> Partial:
        start = jnp.minimum(i * block, s - block)
        return merge(carry, block_partial(start, i * block, block))

    blocks = [jax.ShapeDtypeStruct((k.shape[0], block) + k.shape[2:], k.dtype) for k in keys]
    score_shape = jax.eval_shape(scores_fn, *blocks).shape  # [B, N, T, block]
    out_shape = jax.eval_shape(values_fn, jax.ShapeDtypeStruct(score_shape, dtype), *blocks).shape  # [B, T, N, C]
    init = (jnp.full(score_shape[:3], NEG_INF, jnp.float32), jnp.zeros(score_shape[:3], jnp.float32),
            jnp.zeros(out_shape, jnp.float32))
    if limit is None:
        return jax.lax.scan(lambda c, i: (step(i, c), None), init, jnp.arange(-(-s // block)))[0]
    count = jnp.clip(limit - offset, 0, s)
    return jax.lax.fori_loop(0, (count + block - 1) // block, step, init)


def merge(a: Partial, b: Partial) -> Partial:
    """The partial over the keys of a and b together."""
    top = jnp.maximum(a[0], b[0])
    wa, wb = jnp.exp(a[0] - top), jnp.exp(b[0] - top)
    return top, a[1] * wa + b[1] * wb, a[2] * jnp.swapaxes(wa, 1, 2)[..., None] + b[2] * jnp.swapaxes(wb, 1, 2)[..., None]


def combine_over(p: Partial, axis: str) -> Partial:
    """Inside `shard_map`: the partial over the keys of every shard of mesh axis `axis`."""
    top = jax.lax.pmax(p[0], axis)
    w = jnp.exp(p[0] - top)
    return top, jax.lax.psum(p[1] * w, axis), jax.lax.psum(p[2] * jnp.swapaxes(w, 1, 2)[..., None], axis)


def normalise(p: Partial, dtype: Any) -> Array:
    """softmax @ values [B, T, N, C] (dtype) from a partial."""
    return (p[2] / jnp.swapaxes(p[1], 1, 2)[..., None]).astype(dtype)


def attend(scores_fn: Callable[..., Array], values_fn: Callable[..., Array], keys: tuple[Array, ...],
           key_valid: Array, q_slot: Array, scale: Array, dtype: Any, block: int) -> Array:
    """softmax(masked scores * scale) @ values over all S keys: [B, T, N, C] (see `attend_partial`)."""
    return normalise(attend_partial(scores_fn, values_fn, keys, key_valid, q_slot, scale, dtype, block), dtype)


# ------------------------------------------------------------------------------- the latent cache
def seq_axis(mesh: Mesh | None, slots: int, rules: ShardingRules) -> str | None:
    """The mesh axis the cache's slots are split over: `rules`' "cache_seq" when it has more than one device
    and divides `slots` (as `cache.cache_shardings` lays the cache out), else None."""
    axis = rules.get("cache_seq") if mesh is not None else None
    return axis if axis and mesh.shape[axis] > 1 and slots % mesh.shape[axis] == 0 else None


def _split(mesh: Mesh, rules: ShardingRules, name: str, size: int) -> str | None:
    """`name`'s mesh axis when it divides `size`, else None (replicated)."""
    axis = rules.get(name)
    return axis if axis and size % mesh.shape[axis] == 0 else None


def latent_attention(q_lat: Array, q_rope: Array, cache: LayerCache, cache_valid: Array, new: LayerCache,
                     new_valid: Array, index: Array | int, scale: Array, dtype: Any, block: int,
                     mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES) -> Array:
    """Absorbed MLA over a layer's latent cache and the T new tokens: context [B, T, N, L] (dtype).

    q_lat [B, T, N, L] (the nope query through k_b), q_rope [B, T, N, R]; cache: latent [B, S, L], k_rope
    [B, S, R] with cache_valid [B, S]; new: the new tokens' latent [B, T, L] and k_rope [B, T, R] (at slots
    index..index+T-1) with new_valid [B, T]. Query t (slot index + t) sees the valid cache slots before
    `index` and the valid new tokens up to itself: two partials, merged. The cache is read as it was before
    this step (its slots from `index` on are never read), so the write can wait (`write_tokens`).
    With the slots split over a mesh axis (`seq_axis`), each shard attends over its own slots under
    `shard_map` and the partials are combined across the axis: per-chip cache reads fall with the chips.
    """
    t = q_lat.shape[1]
    q_slot = index + jnp.arange(t)

    def scores(lat_s: Array, rope_s: Array, q_lat: Array = q_lat, q_rope: Array = q_rope) -> Array:
        return (jnp.einsum("btnl,bsl->bnts", q_lat, lat_s.astype(dtype))
                + jnp.einsum("btnr,bsr->bnts", q_rope, rope_s.astype(dtype)))

    def values(probs: Array, lat_s: Array, rope_s: Array) -> Array:
        return jnp.einsum("bnts,bsl->btnl", probs, lat_s.astype(dtype))

    fresh = attend_partial(scores, values, (new.latent, new.k_rope), new_valid, q_slot, scale, dtype, block,
                           offset=index)
    axis = seq_axis(mesh, cache_valid.shape[1], rules)
    if axis is None:
        old = attend_partial(scores, values, (cache.latent, cache.k_rope), cache_valid, q_slot, scale, dtype, block,
                             limit=jnp.asarray(index))
        return normalise(merge(old, fresh), dtype)

    def local(q_lat: Array, q_rope: Array, scale: Array, latent: Array, k_rope: Array, valid: Array,
              index: Array) -> Partial:
        offset = jax.lax.axis_index(axis) * valid.shape[1]
        q_slot = index + jnp.arange(t)
        part = attend_partial(lambda a, b: scores(a, b, q_lat, q_rope), values, (latent, k_rope), valid, q_slot,
                              scale, dtype, block, offset=offset, limit=index)
        return combine_over(part, axis)

    b, n = q_lat.shape[0], q_lat.shape[2]
    rows, heads = _split(mesh, rules, "cache_batch", b), _split(mesh, rules, "heads", n)
    q_spec, c_spec = P(rows, None, heads, None), P(rows, axis, None)
    old = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, q_spec, P(rows), c_spec, c_spec, P(rows, axis), P()),
                        out_specs=(P(rows, heads), P(rows, heads), q_spec), check_vma=False)(
        q_lat, q_rope, scale, cache.latent, cache.k_rope, cache_valid, jnp.asarray(index, jnp.int32))
    return normalise(merge(old, fresh), dtype)


def write_tokens(gc: LayerCache, new: LayerCache, layer: Array | int, index: Array | int, mesh: Mesh | None = None,
                 rules: ShardingRules = DEFAULT_RULES) -> LayerCache:
    """The group cache gc [Lg, B, S, .] with layer `layer`'s slots index..index+T-1 set to new [B, T, .], in place
    (`_write_window`). With the slots split over a mesh axis each shard updates the slots that fall in it
    (XLA's partitioner would gather the whole cache for a dynamic update of a split dimension)."""
    layer, index = jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)
    axis = seq_axis(mesh, gc.latent.shape[2], rules)

    def local(g: Array, x: Array, layer: Array, index: Array) -> Array:
        return _write_window(g, x[None].astype(g.dtype), (layer, 0, 0, 0), 2, index, axis)

    if axis is not None:
        rows = _split(mesh, rules, "cache_batch", gc.latent.shape[1])
        local = jax.shard_map(local, mesh=mesh, in_specs=(P(None, rows, axis, None), P(rows, None, None), P(), P()),
                              out_specs=P(None, rows, axis, None), check_vma=False)
    return jax.tree.map(lambda g, x: local(g, x, layer, index), gc, new)


def write_valid(valid: Array, new: Array, index: Array | int, mesh: Mesh | None = None,
                rules: ShardingRules = DEFAULT_RULES) -> Array:
    """valid [B, S] with slots index..index+T-1 set to new [B, T] (split over the mesh as `write_tokens`)."""
    axis = seq_axis(mesh, valid.shape[1], rules)
    index = jnp.asarray(index, jnp.int32)
    if axis is None:
        return _write_window(valid, new, (0, 0), 1, index)
    rows = _split(mesh, rules, "cache_batch", valid.shape[0])
    return jax.shard_map(lambda v, x, i: _write_window(v, x, (0, 0), 1, i, axis), mesh=mesh,
                         in_specs=(P(rows, axis), P(rows, None), P()), out_specs=P(rows, axis),
                         check_vma=False)(valid, new, index)


WRITE_ALIGN = 8
"""Cache writes rewrite whole groups of this many slots (a TPU tile's rows): a write of one token per row at
an unaligned slot makes XLA:TPU relayout the whole cache each step (v5e-16, B=8 x 65,536: 4.3 GiB copied)."""


def _write_window(g: Array, x: Array, start: tuple[Any, ...], dim: int, index: Array, axis: str | None = None) -> Array:
    """g's slots (dimension `dim`, S' of them) with x's T tokens (x like g but T along `dim`; `start` places it on
    the other dimensions) written at slot `index` on; inside `shard_map` over `axis`, g holds this shard's
    slots and `index` is global (tokens that fall in other shards are left out). One window of whole
    `WRITE_ALIGN`-slot groups covering the tokens (clamped into g) is rewritten in place: the tokens where
    they land, the old values elsewhere."""
    s, t = g.shape[dim], x.shape[dim]
    size = min(-(-t // WRITE_ALIGN) * WRITE_ALIGN + WRITE_ALIGN, s)
    offset = jax.lax.axis_index(axis) * s if axis is not None else 0
    first = jnp.clip((index - offset) // WRITE_ALIGN * WRITE_ALIGN, 0, s - size)  # the window's first slot
    token = offset + first + jnp.arange(size) - index  # the token landing in each slot of the window
    lands = ((token >= 0) & (token < t)).reshape([size if d == dim else 1 for d in range(g.ndim)])
    corner = tuple(jnp.asarray(first if d == dim else c, jnp.int32) for d, c in enumerate(start))
    old = jax.lax.dynamic_slice(g, corner, [size if d == dim else x.shape[d] for d in range(g.ndim)])
    new = jnp.take(x, jnp.clip(token, 0, t - 1), axis=dim)
    return jax.lax.dynamic_update_slice(g, jnp.where(lands, new, old), corner)
