"""Rotary position embeddings (every HF `rope_type`, YaRN included) and Llama 4's query scale.

R is qk_rope_head_dim; B batch, T tokens.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Mistral4Config, yarn_get_mscale

Array = jax.Array


def rope_inv_freq(cfg: Mistral4Config, seq_len: Array | None = None) -> tuple[Any, float]:
    """Inverse frequencies [R/2] (float32; [B, R/2] for "dynamic"/"longrope" given seq_len [B]) and the
    cos/sin attention factor, as transformers' `ROPE_INIT_FUNCTIONS` compute them over R = qk_rope_head_dim:

    - "default" `theta^(-2i/R)`; "linear" those / factor; "proportional" (qk_nope_head_dim 0) the first
      `partial_rotary_factor` of them / factor, the rest 0 (not rotated).
    - "llama3": wavelengths above `original_max / low_freq_factor` divided by factor, below
      `original_max / high_freq_factor` kept, a smooth blend between.
    - "yarn": a linear ramp between the correction dims (from beta_fast/beta_slow) blends extrapolated
      (`1/base_i`) and interpolated (`1/(factor*base_i)`) frequencies.
    - "dynamic" (NTK) and "longrope" depend on the row's current length `seq_len` (its largest position + 1 in
      this call, as transformers' `dynamic_rope_update` takes it from the call's position ids): past
      L0 = max_position_embeddings, dynamic uses `theta * (factor * L / L0 - factor + 1) ^ (R / (R - 2))`;
      longrope divides by `long_factor` instead of `short_factor` past original_max_position_embeddings.
      seq_len None gives their short-sequence frequencies.
    """
    dim, base, factor, kind = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_type
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponent
    plain = (1.0 / pos_freqs).astype(np.float32)
    if kind == "default":
        return plain, 1.0
    if kind == "linear":
        return plain / np.float32(factor), 1.0
    if kind == "proportional":
        pairs = int((1.0 if cfg.partial_rotary_factor is None else cfg.partial_rotary_factor) * dim // 2)
        return np.where(np.arange(dim // 2) < pairs, plain, np.float32(0)) / np.float32(factor), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(cfg, plain), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, pos_freqs)
    if kind == "dynamic":
        if seq_len is None:
            return plain, 1.0
        long = cfg.max_position_embeddings
        length = jnp.maximum(seq_len, long).astype(jnp.float32)
        theta = base * (factor * length / long - (factor - 1)) ** (dim / (dim - 2))  # [B]
        grown = 1.0 / theta[:, None] ** jnp.asarray(exponent)
        return jnp.where((seq_len > long)[:, None], grown, jnp.asarray(plain)), 1.0
    # longrope
    orig = cfg.original_max_position_embeddings
    attn_factor = cfg.rope_attention_factor
    if attn_factor is None:
        attn_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    short, long_ = (1.0 / (np.asarray(f, np.float32) * pos_freqs) for f in (cfg.rope_short_factor, cfg.rope_long_factor))
    if seq_len is None:
        return short, attn_factor
    return jnp.where((seq_len > orig)[:, None], jnp.asarray(long_), jnp.asarray(short)), attn_factor


def _llama3_inv_freq(cfg: Mistral4Config, inv_freq: np.ndarray) -> np.ndarray:
    """transformers' `_compute_llama3_parameters` on the plain frequencies [R/2] (float32)."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    with np.errstate(divide="ignore", invalid="ignore"):  # high == low: no medium band, the blend is unused
        smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_inv_freq(cfg: Mistral4Config, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    """transformers' `_compute_yarn_parameters` from `theta^(2i/R)` [R/2]: (inv_freq, attention factor)."""
    dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(cfg.original_max_position_embeddings / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = 1 - ramp
    inv_freq = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    if cfg.rope_attention_factor is not None:
        attn_factor = cfg.rope_attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        attn_factor = yarn_get_mscale(factor, cfg.mscale) / yarn_get_mscale(factor, cfg.mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(factor)
    return inv_freq.astype(np.float32), float(attn_factor)


def rope_cos_sin(cfg: Mistral4Config, positions: Array, seq_len: Array | None = None) -> tuple[Array, Array]:
    """cos, sin [B, T, R/2] (float32) for integer positions [B, T]; seq_len [B] as in `rope_inv_freq`."""
    inv_freq, attn_factor = rope_inv_freq(cfg, seq_len)
    inv_freq = jnp.asarray(inv_freq)
    if inv_freq.ndim == 2:  # per row
        inv_freq = inv_freq[:, None]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: Array, cos: Array, sin: Array, interleave: bool) -> Array:
    """Rotate the last axis (R rope dims) of x; cos/sin [..., R/2] broadcast against x[..., :R/2].

    interleave=True rotates the pairs (x[2i], x[2i+1]) and writes the result de-interleaved
    (all rotated evens, then all rotated odds), as HF's `apply_rotary_pos_emb_interleave`;
    interleave=False rotates (x[i], x[i + R/2]) ("rotate half").
    """
    half = x.shape[-1] // 2
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama4_query_scale(cfg: Mistral4Config, positions: Array) -> Array:
    """Per-position query multiplier [B, T]: 1 + beta * ln(1 + floor(pos / original_max_position_embeddings))."""
    if not cfg.llama_4_scaling_beta:
        return jnp.ones(positions.shape, jnp.float32)
    p = positions.astype(jnp.float32)
    return 1 + cfg.llama_4_scaling_beta * jnp.log1p(jnp.floor(p / cfg.original_max_position_embeddings))
