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

from typing import Any

import jax
import jax.numpy as jnp

from ..activations import ACTIVATIONS
from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules
from ..weights.quant import dequantize, qeinsum
from .cache import LayerCache
from .moe import route, routed_experts, sharded_routed_experts
from .rope import apply_rope

Array = jax.Array
Params = dict[str, Any]
_NEG_INF = -1e30


def rms_norm(p: Params, x: Array, eps: float, dtype: Any) -> Array:
    """x * rsqrt(mean(x^2) + eps) in float32, cast to `dtype`, times p["scale"]; x [..., C]."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return p["scale"].astype(dtype) * y.astype(dtype)


def mlp(p: Params, x: Array, cfg: Mistral4Config) -> Array:
    """Gated MLP: down(act(gate x) * up x) with act = `cfg.hidden_act`; x [..., D] -> [..., D] (x's dtype)."""
    h = ACTIVATIONS[cfg.hidden_act](qeinsum("...d,di->...i", x, p["gate_proj"])) * qeinsum("...d,di->...i", x, p["up_proj"])
    return qeinsum("...i,id->...d", h, p["down_proj"])


def _attend(scores: Array, scale: Array, mask: Array, dtype: Any) -> Array:
    """Masked softmax in float32: scores [B, N, T, S], scale [B, 1, T, 1], mask [B, T, S] -> probs (dtype)."""
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32) * scale, _NEG_INF)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def mla(p: Params, x: Array, cos: Array, sin: Array, qscale: Array, mask: Array, cfg: Mistral4Config, dtype: Any,
        cache: LayerCache | None = None, index: Array | int = 0, decode: bool = False):
    """Multi-head latent attention: low-rank q and kv, one rope key shared by all heads.

    x [B, T, D], cos/sin [B, T, R/2], qscale [B, T] -> ([B, T, D], cache).
    Without `decode`: attention among the T new tokens, expanded per head (mask [B, T, T]).
    With `decode`: attention over the whole latent cache (mask [B, T, S]) with `kv_b_proj` absorbed into
    the query (scores) and the output (values), never expanding the cache per head. T may be > 1: a chunk
    of new tokens then attends to the cached prefix and to itself (causally, through the mask).
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
    k_b, v_b = dequantize(p["k_b_proj"], dtype), dequantize(p["v_b_proj"], dtype)  # [L, N, P], [L, N, V]
    scale = qscale[:, None, :, None] * c.softmax_scale
    if cache is not None:
        cache = LayerCache(
            jax.lax.dynamic_update_slice_in_dim(cache.latent, latent.astype(cache.latent.dtype), index, axis=1),
            jax.lax.dynamic_update_slice_in_dim(cache.k_rope, k_rope.astype(cache.k_rope.dtype), index, axis=1))
    if decode:
        assert cache is not None, "decode attends over a cache"
        lat_s, rope_s = cache.latent.astype(dtype), cache.k_rope.astype(dtype)  # [B, S, L], [B, S, R]
        q_lat = jnp.einsum("btnp,lnp->btnl", q_nope, k_b)
        scores = jnp.einsum("btnl,bsl->bnts", q_lat, lat_s) + jnp.einsum("btnr,bsr->bnts", q_rope, rope_s)
        ctx = jnp.einsum("bnts,bsl->btnl", _attend(scores, scale, mask, dtype), lat_s)
        out = jnp.einsum("btnl,lnv->btnv", ctx, v_b)
    else:
        k_nope = jnp.einsum("bsl,lnp->bsnp", latent, k_b)
        values = jnp.einsum("bsl,lnv->bsnv", latent, v_b)
        scores = jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope) + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope)
        out = jnp.einsum("bnts,bsnv->btnv", _attend(scores, scale, mask, dtype), values)
    return qeinsum("btnv,nvd->btd", out, p["o_proj"]), cache


def moe(p: Params, x: Array, cfg: Mistral4Config, mesh: Any = None,
        backend: str = "loop", rules: ShardingRules = DEFAULT_RULES) -> tuple[Array, Array]:
    """Routed experts (fused [E, ...] arrays) plus the shared expert; x [B, T, D] -> ([B, T, D], ids [B, T, K])
    in x's dtype.
    `backend`: the routed experts' kernel, "loop" or "ragged" (`routed_experts`); with a `mesh` they run
    expert-parallel (`sharded_routed_experts`, laid out by `rules`)."""
    b, t, d = x.shape
    weights, ids = route(qeinsum("btd,de->bte", x, p["router"]).reshape(b * t, -1), cfg)
    experts = (x.reshape(b * t, d), ids, weights, p["experts_gate"], p["experts_up"], p["experts_down"])
    act = ACTIVATIONS[cfg.hidden_act]
    if mesh is not None:
        y = sharded_routed_experts(mesh, *experts, act=act, backend=backend, rules=rules)
    else:
        y = routed_experts(*experts, act=act, backend=backend)
    y = y.reshape(b, t, d) + mlp(p["shared_expert"], x, cfg)
    return y, ids.reshape(b, t, -1)


def decoder_layer(p: Params, h: Array, cos: Array, sin: Array, qscale: Array, mask: Array, cfg: Mistral4Config,
                  dtype: Any, mesh: Any = None, moe_backend: str = "loop", cache: LayerCache | None = None,
                  index: Array | int = 0, decode: bool = False, rules: ShardingRules = DEFAULT_RULES):
    """h + attn(norm(h)), then + ffn(norm(h)), the ffn the MoE if p has one, else the dense MLP.
    h [B, T, D] -> (h, (routed expert ids [B, T, K] or None, cache))."""
    x = rms_norm(p["input_norm"], h, cfg.rms_norm_eps, dtype)
    a, cache = mla(p["attn"], x, cos, sin, qscale, mask, cfg, dtype, cache, index, decode)
    h = h + a
    x = rms_norm(p["post_attn_norm"], h, cfg.rms_norm_eps, dtype)
    if "moe" in p:
        y, ids = moe(p["moe"], x, cfg, mesh, moe_backend, rules)
    else:
        y, ids = mlp(p["mlp"], x, cfg), None
    return h + y, (ids, cache)
