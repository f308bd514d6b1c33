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
from .attention import attend, latent_attention
from .cache import LayerCache
from .moe import route, routed_experts, sharded_routed_experts
from .rope import apply_rope
from .splash import splash_causal_attention

Array = jax.Array
Params = dict[str, Any]
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


def mla(p: Params, x: Array, cos: Array, sin: Array, qscale: Array, key_valid: Array, cfg: Mistral4Config,
        dtype: Any, cache: LayerCache | None = None, cache_valid: Array | None = None, index: Array | int = 0,
        decode: bool = False, attn_block: int = ATTN_BLOCK, attn_backend: str = "xla", mesh: Any = None,
        rules: ShardingRules = DEFAULT_RULES) -> tuple[Array, LayerCache]:
    """Multi-head latent attention: low-rank q and kv, one rope key shared by all heads.

    x [B, T, D] (the new tokens, at slots index..index+T-1), cos/sin [B, T, R/2], qscale [B, T],
    key_valid [B, T] bool (False = padding) -> ([B, T, D], the new tokens' `LayerCache`: latent [B, T, L] and
    k_rope [B, T, R], for the caller to write at slot `index`).
    Without `decode`: attention among the T new tokens, causal, expanded per head block by block (`attend`;
    with `attn_backend` "splash" (TPU) one fused kernel, `splash.splash_causal_attention`, sharded on `mesh`
    by `rules`). With `decode`: the tokens attend to this layer's cache (latent [B, S, L], k_rope [B, S, R],
    its slots before `index` where cache_valid [B, S]) and causally to themselves, with `kv_b_proj` absorbed
    into the query and the output, never expanding the cache per head (`attention.latent_attention`; the
    slots split over a mesh axis by `rules`' "cache_seq"). T = 1 is a decode step; T > 1 a chunk of prompt
    after a cached prefix. Both run over `attn_block` keys at a time.
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
    new = LayerCache(latent, k_rope)
    if decode:
        assert cache is not None and cache_valid is not None, "decode attends over a cache"
        q_lat = qeinsum("btnp,lnp->btnl", q_nope, p["k_b_proj"])  # k_b [L, N, P]
        ctx = latent_attention(q_lat, q_rope, cache, cache_valid, new, key_valid, index, scale, dtype, attn_block,
                               mesh, rules)
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

        out = attend(scores, values, (latent, k_rope), key_valid, jnp.arange(x.shape[1]), scale, dtype, attn_block)
    return qeinsum("btnv,nvd->btd", out, p["o_proj"]), new


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


def decoder_layer(p: Params, h: Array, cos: Array, sin: Array, qscale: Array, key_valid: Array, cfg: Mistral4Config,
                  dtype: Any, mesh: Any = None, moe_backend: str = "loop", cache: LayerCache | None = None,
                  cache_valid: Array | None = None, index: Array | int = 0, decode: bool = False,
                  rules: ShardingRules = DEFAULT_RULES, attn_block: int = ATTN_BLOCK, expert_layer: Array | None = None,
                  attn_backend: str = "xla"):
    """h + attn(norm(h)), then + ffn(norm(h)), the ffn the MoE if p has one, else the dense MLP.
    h [B, T, D] -> (h, (routed expert ids [B, T, K] or None, the new tokens' `LayerCache`)); key_valid, cache,
    cache_valid, index, decode as `mla`'s.
    `expert_layer`: p's routed experts are the group's stacks [Lg, E, ...] and this is layer `expert_layer`."""
    x = rms_norm(p["input_norm"], h, cfg.rms_norm_eps, dtype)
    a, new = mla(p["attn"], x, cos, sin, qscale, key_valid, cfg, dtype, cache, cache_valid, index, decode, attn_block,
                 attn_backend, mesh, rules)
    h = h + a
    x = rms_norm(p["post_attn_norm"], h, cfg.rms_norm_eps, dtype)
    if "moe" in p:
        y, ids = moe(p["moe"], x, cfg, mesh, moe_backend, rules, expert_layer)
    else:
        y, ids = mlp(p["mlp"], x, cfg), None
    return h + y, (ids, new)
