"""The text decoder's layers as Flax (linen) modules: RMSNorm, gated MLP, multi-head latent attention,
MoE and the decoder layer that combines them.

Storage dtype (`param_dtype`) and compute dtype (`dtype`) are separate: on CPU compute in float32
whatever the weights are stored in.

Einsum letters: B batch, T query tokens, S key positions, D hidden, N heads, Q q_lora rank,
L kv_lora rank (the latent), P nope dims, R rope dims, H = P + R, V value dims, E experts, K top-k,
F expert hidden, I dense hidden, X vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import Mistral4Config
from ..activations import ACTIVATIONS
from .moe import route, routed_experts, sharded_routed_experts
from .rope import apply_rope

Array = jax.Array
_NEG_INF = -1e30


def _normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


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


class _Base(nn.Module):
    """Shared helpers: `dtype` is the compute dtype, `param_dtype` the storage dtype, `mesh` (or None)
    the device mesh that the MoE shards its experts over.

    With an FP8 `param_dtype`, the weights in `FP8_WEIGHTS` are stored as float8_e4m3fn with a float32
    `<name>_scale` beside them (dequantised on use: `float(w) * scale`); all others are stored in bfloat16.
    `apply` follows the parameters it is given: a weight of `FP8_WEIGHTS` stored in a float dtype (a
    `float_weights` entry) is used as it is, without a scale.
    """

    cfg: Mistral4Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mesh: Any = None

    def storage_dtype(self, name: str) -> Any:
        return jnp.bfloat16 if is_fp8(self.param_dtype) and name not in FP8_WEIGHTS else self.param_dtype

    def stored(self, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init=None) -> tuple[Array, Array | None]:
        """Declare parameter `name` and return it as stored, with its FP8 scale (or None)."""
        init = _normal() if init is None else init
        w = jnp.asarray(self.param(name, nn.with_logical_partitioning(init, axes), shape, self.storage_dtype(name)))
        if not is_fp8(w.dtype):
            return w, None
        scale_shape = fp8_scale_shape(name, shape)
        scale_axes = tuple(a if n > 1 else None for a, n in zip(axes, scale_shape))
        scale = self.param(name + "_scale", nn.with_logical_partitioning(nn.initializers.ones, scale_axes), scale_shape, jnp.float32)
        return w, jnp.asarray(scale)

    def weight(self, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init=None) -> Array:
        """Parameter `name` in the compute dtype (FP8 dequantised: float(w) * scale)."""
        w, scale = self.stored(name, axes, shape, init)
        w = w.astype(self.dtype)
        return w if scale is None else w * scale.astype(self.dtype)


class RMSNorm(_Base):
    """x * rsqrt(mean(x^2) + eps) in float32, cast to the compute dtype, times `scale`."""

    eps: float = 1e-6
    axis: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.weight("scale", (self.axis,), (x.shape[-1],), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(self.dtype)


class MLP(_Base):
    """Gated MLP: down(act(gate x) * up x) with act = `cfg.hidden_act`; x [..., D] -> [..., D]."""

    width: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.cfg.hidden_size
        gate = self.weight("gate_proj", ("embed", "mlp"), (d, self.width))
        up = self.weight("up_proj", ("embed", "mlp"), (d, self.width))
        down = self.weight("down_proj", ("mlp", "embed"), (self.width, d))
        return (ACTIVATIONS[self.cfg.hidden_act](x @ gate) * (x @ up)) @ down


def _attend(scores: Array, scale: Array, mask: Array, dtype: Any) -> Array:
    """Masked softmax in float32: scores [B, N, T, S], scale [B, 1, T, 1], mask [B, T, S] -> probs (dtype)."""
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32) * scale, _NEG_INF)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


class MLA(_Base):
    """Multi-head latent attention: low-rank q and kv, one rope key shared by all heads.

    x [B, T, D], cos/sin [B, T, R/2], qscale [B, T] -> ([B, T, D], cache).
    Without `decode`: attention among the T new tokens, expanded per head (mask [B, T, T]).
    With `decode`: attention over the whole latent cache (mask [B, T, S]) with `kv_b_proj` absorbed into
    the query (scores) and the output (values), never expanding the cache per head. T may be > 1: a chunk
    of new tokens then attends to the cached prefix and to itself (causally, through the mask).
    `cache` = (latent [B, S, L], k_rope [B, S, R]) or None; the new tokens are written at slot `index`.
    """

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, qscale: Array, mask: Array,
                 cache: tuple[Array, Array] | None = None, index: Array | int = 0, decode: bool = False):
        c = self.cfg
        d, n, p, r, v, lat = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        norm = functools.partial(RMSNorm, c, self.dtype, self.param_dtype, None, 1e-6)
        if c.q_lora_rank:
            q = x @ self.weight("q_a_proj", ("embed", "q_lora"), (d, c.q_lora_rank))
            q = norm(axis="q_lora", name="q_a_norm")(q)
            q = jnp.einsum("btq,qnh->btnh", q, self.weight("q_b_proj", ("q_lora", "heads", "qk_dim"), (c.q_lora_rank, n, p + r)))
        else:
            q = jnp.einsum("btd,dnh->btnh", x, self.weight("q_proj", ("embed", "heads", "qk_dim"), (d, n, p + r)))
        q_nope = q[..., :p]
        q_rope = apply_rope(q[..., p:], cos[:, :, None], sin[:, :, None], c.rope_interleave)  # [B, T, N, R]
        kv = x @ self.weight("kv_a_proj", ("embed", "kv_lora_rope"), (d, lat + r))
        latent = norm(axis="kv_lora", name="kv_a_norm")(kv[..., :lat])  # [B, T, L]
        k_rope = apply_rope(kv[..., lat:], cos, sin, c.rope_interleave)  # [B, T, R]
        k_b = self.weight("k_b_proj", ("kv_lora", "heads", "qk_nope_dim"), (lat, n, p))
        v_b = self.weight("v_b_proj", ("kv_lora", "heads", "v_dim"), (lat, n, v))
        scale = qscale[:, None, :, None] * c.softmax_scale
        if cache is not None:
            cache = (jax.lax.dynamic_update_slice_in_dim(cache[0], latent.astype(cache[0].dtype), index, axis=1),
                     jax.lax.dynamic_update_slice_in_dim(cache[1], k_rope.astype(cache[1].dtype), index, axis=1))
        if decode:
            assert cache is not None, "decode attends over a cache"
            lat_s, rope_s = cache[0].astype(self.dtype), cache[1].astype(self.dtype)  # [B, S, L], [B, S, R]
            q_lat = jnp.einsum("btnp,lnp->btnl", q_nope, k_b)
            scores = jnp.einsum("btnl,bsl->bnts", q_lat, lat_s) + jnp.einsum("btnr,bsr->bnts", q_rope, rope_s)
            ctx = jnp.einsum("bnts,bsl->btnl", _attend(scores, scale, mask, self.dtype), lat_s)
            out = jnp.einsum("btnl,lnv->btnv", ctx, v_b)
        else:
            k_nope = jnp.einsum("bsl,lnp->bsnp", latent, k_b)
            values = jnp.einsum("bsl,lnv->bsnv", latent, v_b)
            scores = jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope) + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope)
            out = jnp.einsum("bnts,bsnv->btnv", _attend(scores, scale, mask, self.dtype), values)
        return jnp.einsum("btnv,nvd->btd", out, self.weight("o_proj", ("heads", "v_dim", "embed"), (n, v, d))), cache


class MoE(_Base):
    """Routed experts (fused [E, ...] arrays) plus the shared expert; x [B, T, D] -> ([B, T, D], ids [B, T, K]).
    `backend`: the routed experts' kernel, "loop" or "ragged" (`routed_experts`)."""

    backend: str = "loop"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        c = self.cfg
        d, e, f = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        b, t, _ = x.shape
        router = self.weight("router", ("embed", "router_experts"), (d, e))
        weights, ids = route((x @ router).reshape(b * t, e), c)
        gate, gs = self.stored("experts_gate", ("experts", "embed", "expert_mlp"), (e, d, f))
        up, us = self.stored("experts_up", ("experts", "embed", "expert_mlp"), (e, d, f))
        down, ds = self.stored("experts_down", ("experts", "expert_mlp", "embed"), (e, f, d))
        scales = None if gs is us is ds is None else (gs, us, ds)
        act = ACTIVATIONS[c.hidden_act]
        if self.mesh is not None:
            y = sharded_routed_experts(self.mesh, x.reshape(b * t, d), ids, weights, gate, up, down, scales, act,
                                       backend=self.backend)
        else:
            y = routed_experts(x.reshape(b * t, d), ids, weights, gate, up, down, scales=scales, act=act,
                               backend=self.backend)
        y = y.reshape(b, t, d)
        y = y + MLP(c, self.dtype, self.param_dtype, self.mesh, width=c.shared_intermediate_size, name="shared_expert")(x)
        return y, ids.reshape(b, t, -1)


class DecoderLayer(_Base):
    """h + attn(norm(h)), then + ffn(norm(h)). Returns (h, (routed expert ids or None, cache))."""

    moe: bool = True
    moe_backend: str = "loop"

    @nn.compact
    def __call__(self, h: Array, cos: Array, sin: Array, qscale: Array, mask: Array,
                 cache: tuple[Array, Array] | None = None, index: Array | int = 0, decode: bool = False):
        c = self.cfg
        sub = (c, self.dtype, self.param_dtype, self.mesh)
        norm = functools.partial(RMSNorm, *sub, c.rms_norm_eps)
        a, cache = MLA(*sub, name="attn")(norm(name="input_norm")(h), cos, sin, qscale, mask, cache, index, decode)
        h = h + a
        x = norm(name="post_attn_norm")(h)
        if self.moe:
            y, ids = MoE(*sub, backend=self.moe_backend, name="moe")(x)
        else:
            y, ids = MLP(*sub, width=c.intermediate_size, name="mlp")(x), None
        return h + y, (ids, cache)
