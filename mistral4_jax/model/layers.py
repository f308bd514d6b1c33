"""The text decoder's layers as pure functions of their parameters (`params.param_specs` declares them):
RMSNorm, gated MLP, multi-head latent attention, MoE and the decoder layer that combines them.

`p` is the layer's (or block's) parameter dict as stored (FP8 weights as `QuantArray`s); `dtype` is the compute
dtype: weights are cast to it (dequantised, `qeinsum`) where they are read, so on CPU compute runs in float32
whatever the storage dtype.

Einsum letters: B batch, T query tokens, S key positions, D hidden, N heads, Q q_lora rank,
L kv_lora rank (the latent), P nope dims, R rope dims, H = P + R, V value dims, E experts, K top-k,
F expert hidden, I dense hidden, X vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..activations import ACTIVATIONS
from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules
from ..weights.quant import qeinsum
from .cache import LayerCache
from .moe import route, routed_experts, sharded_routed_experts
from .rope import apply_rope
from .splash import splash_causal_attention

Array = jax.Array
Params = dict[str, Any]
_NEG_INF = -1e30
ATTN_BLOCK = 512  # keys per attention block (`mla`): temporaries [B, N, T, ATTN_BLOCK]


def rms_norm(p: Params, x: Array, eps: float, dtype: Any) -> Array:
    """x * rsqrt(mean(x^2) + eps) in float32, cast to `dtype`, times p["scale"]; x [..., C]."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return p["scale"].astype(dtype) * y.astype(dtype)


def mlp(p: Params, x: Array, cfg: Mistral4Config) -> Array:
    """Gated MLP: down(act(gate x) * up x) with act = `cfg.hidden_act`; x [..., D] -> [..., D] (x's dtype)."""
    h = ACTIVATIONS[cfg.hidden_act](qeinsum("...d,di->...i", x, p["gate_proj"])) * qeinsum("...d,di->...i", x, p["up_proj"])
    return qeinsum("...i,id->...d", h, p["down_proj"])


def _attend(scores_fn: Callable[..., Array], values_fn: Callable[..., Array], keys: tuple[Array, ...],
            key_valid: Array, q_slot: Array, scale: Array, dtype: Any, block: int) -> Array:
    """softmax(masked scores * scale) @ values over S keys, `block` keys at a time (online softmax).

    keys: arrays [B, S, ...], cut along S; for a block of S' keys scores_fn(*keys) -> scores [B, N, T, S'] and
    values_fn(probs [B, N, T, S'] (dtype), *keys) -> [B, T, N, C]. Key slot s is visible to query t where
    key_valid[b, s] and s <= q_slot[t] (causal by slot): key_valid [B, S] bool, q_slot [T] int,
    scale [B, 1, T, 1] (float32 scores are multiplied by it). Returns [B, T, N, C] (dtype).
    S <= block, or a decode step (T = 1, scores only [B, N, 1, S]): one block, a plain softmax. Otherwise
    `lax.scan` over ceil(S / block) key blocks carrying the float32 running max and sum [B, N, T] and the
    unnormalised output [B, T, N, C], so the temporaries are [B, N, T, block], never [B, N, T, S]. The last
    block is slid back to end at S (dynamic_slice clamps its start) and its already-seen keys masked: nothing
    is padded or copied.
    """
    s, t = key_valid.shape[1], q_slot.shape[0]

    def masked_scores(ks: list[Array], start: Array | int, first: Array | int) -> Array:
        slot = start + jnp.arange(ks[0].shape[1])  # [S']
        ok = jax.lax.dynamic_slice_in_dim(key_valid, start, slot.shape[0], axis=1) & (slot >= first)  # [B, S']
        ok = ok[:, None, :] & (slot[None, :] <= q_slot[:, None])  # [B, T, S']
        return jnp.where(ok[:, None], scores_fn(*ks).astype(jnp.float32) * scale, _NEG_INF)

    if t == 1 or s <= block:
        return values_fn(jax.nn.softmax(masked_scores(list(keys), 0, 0), axis=-1).astype(dtype), *keys)

    def step(carry: tuple[Array, Array, Array], i: Array) -> tuple[tuple[Array, Array, Array], None]:
        run_max, run_sum, acc = carry
        start = jnp.minimum(i * block, s - block)
        ks = [jax.lax.dynamic_slice_in_dim(k, start, block, axis=1) for k in keys]
        scores = masked_scores(ks, start, i * block)
        new_max = jnp.maximum(run_max, scores.max(-1))
        probs = jnp.exp(scores - new_max[..., None])
        decay = jnp.exp(run_max - new_max)
        acc = acc * jnp.swapaxes(decay, 1, 2)[..., None] + values_fn(probs.astype(dtype), *ks).astype(jnp.float32)
        return (new_max, run_sum * decay + probs.sum(-1), acc), None

    blocks = [jax.ShapeDtypeStruct((k.shape[0], block) + k.shape[2:], k.dtype) for k in keys]
    score_shape = jax.eval_shape(scores_fn, *blocks).shape  # [B, N, T, block]
    out_shape = jax.eval_shape(values_fn, jax.ShapeDtypeStruct(score_shape, dtype), *blocks).shape  # [B, T, N, C]
    init = (jnp.full(score_shape[:3], _NEG_INF, jnp.float32), jnp.zeros(score_shape[:3], jnp.float32),
            jnp.zeros(out_shape, jnp.float32))
    (_, run_sum, acc), _ = jax.lax.scan(step, init, jnp.arange(-(-s // block)))
    return (acc / jnp.swapaxes(run_sum, 1, 2)[..., None]).astype(dtype)


def mla(p: Params, x: Array, cos: Array, sin: Array, qscale: Array, key_valid: Array, q_slot: Array,
        cfg: Mistral4Config, dtype: Any, cache: LayerCache | None = None, index: Array | int = 0,
        decode: bool = False, attn_block: int = ATTN_BLOCK, attn_backend: str = "xla", mesh: Any = None,
        rules: ShardingRules = DEFAULT_RULES):
    """Multi-head latent attention: low-rank q and kv, one rope key shared by all heads.

    x [B, T, D], cos/sin [B, T, R/2], qscale [B, T] -> ([B, T, D], cache).
    Query t sees key slot s where key_valid[b, s] and s <= q_slot[t] (q_slot [T] int).
    Without `decode`: attention among the T new tokens (key_valid [B, T]), expanded per head block by block.
    With `decode`: attention over the whole latent cache (key_valid [B, S]) with `kv_b_proj` absorbed into
    the query (scores) and the output (values), never expanding the cache per head. T may be > 1: a chunk
    of new tokens then attends to the cached prefix and to itself (causally, through q_slot).
    Both run over `attn_block` keys at a time (`_attend`); with `attn_backend` "splash" (TPU) the prefill
    attention is one fused kernel instead (`splash.splash_causal_attention`, sharded on `mesh` by `rules`).
    `cache` = this layer's `LayerCache` (latent [B, S, L], k_rope [B, S, R]) or None; the new tokens are
    written at slot `index`.
    """
    c = cfg
    p_dims, lat = c.qk_nope_head_dim, c.kv_lora_rank
    if c.q_lora_rank:
        q = rms_norm(p["q_a_norm"], qeinsum("btd,dq->btq", x, p["q_a_proj"]), 1e-6, dtype)
        q = qeinsum("btq,qnh->btnh", q, p["q_b_proj"])
    else:
        q = qeinsum("btd,dnh->btnh", x, p["q_proj"])
    q_nope = q[..., :p_dims]
    q_rope = apply_rope(q[..., p_dims:], cos[:, :, None], sin[:, :, None], c.rope_interleave)  # [B, T, N, R]
    kv = qeinsum("btd,dc->btc", x, p["kv_a_proj"])  # [B, T, L + R]
    latent = rms_norm(p["kv_a_norm"], kv[..., :lat], 1e-6, dtype)  # [B, T, L]
    k_rope = apply_rope(kv[..., lat:], cos, sin, c.rope_interleave)  # [B, T, R]
    scale = qscale[:, None, :, None] * c.softmax_scale
    if cache is not None:
        cache = LayerCache(
            jax.lax.dynamic_update_slice_in_dim(cache.latent, latent.astype(cache.latent.dtype), index, axis=1),
            jax.lax.dynamic_update_slice_in_dim(cache.k_rope, k_rope.astype(cache.k_rope.dtype), index, axis=1))
    if decode:
        assert cache is not None, "decode attends over a cache"
        q_lat = qeinsum("btnp,lnp->btnl", q_nope, p["k_b_proj"])  # k_b [L, N, P]

        def scores(lat_s: Array, rope_s: Array) -> Array:  # cache blocks [B, S', L], [B, S', R]
            lat_s, rope_s = lat_s.astype(dtype), rope_s.astype(dtype)
            return jnp.einsum("btnl,bsl->bnts", q_lat, lat_s) + jnp.einsum("btnr,bsr->bnts", q_rope, rope_s)

        def values(probs: Array, lat_s: Array, rope_s: Array) -> Array:
            return jnp.einsum("bnts,bsl->btnl", probs, lat_s.astype(dtype))

        ctx = _attend(scores, values, (cache.latent, cache.k_rope), key_valid, q_slot, scale, dtype, attn_block)
        out = qeinsum("btnl,lnv->btnv", ctx, p["v_b_proj"])  # v_b [L, N, V]
    elif attn_backend == "splash":
        k_nope = qeinsum("bsl,lnp->bsnp", latent, p["k_b_proj"])  # [B, T, N, P]
        k_all = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + k_rope.shape[-1:])], -1)
        q_all = jnp.concatenate([q_nope, q_rope], -1) * jnp.swapaxes(scale, 1, 2).astype(dtype)  # [B, T, N, H]
        v = qeinsum("bsl,lnv->bsnv", latent, p["v_b_proj"])  # [B, T, N, V]
        out = splash_causal_attention(q_all, k_all.astype(dtype), v, key_valid, mesh, rules)
    else:
        def scores(lat_s: Array, rope_s: Array) -> Array:  # new-token blocks [B, S', L], [B, S', R]
            k_nope = qeinsum("bsl,lnp->bsnp", lat_s, p["k_b_proj"])
            return jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope) + jnp.einsum("btnr,bsr->bnts", q_rope, rope_s)

        def values(probs: Array, lat_s: Array, rope_s: Array) -> Array:
            return jnp.einsum("bnts,bsnv->btnv", probs, qeinsum("bsl,lnv->bsnv", lat_s, p["v_b_proj"]))

        out = _attend(scores, values, (latent, k_rope), key_valid, q_slot, scale, dtype, attn_block)
    return qeinsum("btnv,nvd->btd", out, p["o_proj"]), cache


def moe(p: Params, x: Array, cfg: Mistral4Config, mesh: Any = None,
        backend: str = "loop", rules: ShardingRules = DEFAULT_RULES, layer: Array | None = None) -> tuple[Array, Array]:
    """Routed experts (fused [E, ...] arrays, or [Lg, E, ...] for the whole group with `layer` this one, see
    `routed_experts`) plus the shared expert; x [B, T, D] -> ([B, T, D], ids [B, T, K]) in x's dtype.
    `backend`: the routed experts' kernel, "loop" or "ragged" (`routed_experts`); with a `mesh` they run
    expert-parallel (`sharded_routed_experts`, laid out by `rules`)."""
    b, t, d = x.shape
    weights, ids = route(qeinsum("btd,de->bte", x, p["router"]).reshape(b * t, -1), cfg)
    experts = (x.reshape(b * t, d), ids, weights, p["experts_gate"], p["experts_up"], p["experts_down"])
    act = ACTIVATIONS[cfg.hidden_act]
    if mesh is not None:
        y = sharded_routed_experts(mesh, *experts, act=act, backend=backend, rules=rules, layer=layer)
    else:
        y = routed_experts(*experts, act=act, backend=backend, layer=layer)
    y = y.reshape(b, t, d) + mlp(p["shared_expert"], x, cfg)
    return y, ids.reshape(b, t, -1)


def decoder_layer(p: Params, h: Array, cos: Array, sin: Array, qscale: Array, key_valid: Array, q_slot: Array,
                  cfg: Mistral4Config, dtype: Any, mesh: Any = None, moe_backend: str = "loop",
                  cache: LayerCache | None = None, index: Array | int = 0, decode: bool = False,
                  rules: ShardingRules = DEFAULT_RULES, attn_block: int = ATTN_BLOCK, expert_layer: Array | None = None,
                  attn_backend: str = "xla"):
    """h + attn(norm(h)), then + ffn(norm(h)), the ffn the MoE if p has one, else the dense MLP.
    h [B, T, D] -> (h, (routed expert ids [B, T, K] or None, cache)); key_valid, q_slot as `mla`'s.
    `expert_layer`: p's routed experts are the group's stacks [Lg, E, ...] and this is layer `expert_layer`."""
    x = rms_norm(p["input_norm"], h, cfg.rms_norm_eps, dtype)
    a, cache = mla(p["attn"], x, cos, sin, qscale, key_valid, q_slot, cfg, dtype, cache, index, decode, attn_block,
                   attn_backend, mesh, rules)
    h = h + a
    x = rms_norm(p["post_attn_norm"], h, cfg.rms_norm_eps, dtype)
    if "moe" in p:
        y, ids = moe(p["moe"], x, cfg, mesh, moe_backend, rules, expert_layer)
    else:
        y, ids = mlp(p["mlp"], x, cfg), None
    return h + y, (ids, cache)
