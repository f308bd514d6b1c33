"""Pixtral vision tower and Mistral 3 multimodal projector as functional Flax (linen) modules.

Numerics follow transformers' `PixtralVisionModel` + `Mistral3MultiModalProjector`
(`Mistral3Model.get_image_features`):

- tower: `patch_conv` (a [C*p*p -> D] matmul on non-overlapping p x p patches, no bias), each image
  cropped to whole patches, all images flattened row-major into ONE sequence, `ln_pre` RMSNorm (eps 1e-5),
  2-D rope (row frequencies = inv_freq[0::2], column frequencies = inv_freq[1::2], rotate-half), attention
  masked block-diagonally per image, `num_hidden_layers` pre-norm layers (attention_norm -> attention,
  ffn_norm -> gated MLP); the output of layer `vision_feature_layer` (default -1 = last), no final norm.
- projector: RMSNorm (eps = text `rms_norm_eps`) -> patch merger (each image's s x s windows of the patch
  grid, row-major; `merging_layer` s*s*D -> D) -> linear_1 -> act (GELU, erf) -> linear_2.

Layout. Images of any sizes are packed into one sequence of S patches (`pack_images`, host side numpy):
`patches` [S, C*p*p], `positions` [S, 2] (row, column of the patch in its image), `segments` [S] (image
index; padding rows carry `PAD_SEGMENT`) and `merge_index` [M, s*s] (for each output token, the rows of its
window). Only S and M are shapes, so one compiled function serves every mix of image sizes whose packed
length falls in the same bucket. Attention runs in query x key blocks with an online softmax and skips
block pairs that share no image, so memory is O(N * block * block) and compute ~ sum over images of P_i^2.

Einsum letters: S patches (all images), M merged tokens, D vision hidden, N heads, H head dim,
F vision MLP hidden, K = C*p*p patch pixels, W = s*s window positions, T text hidden,
Q / J query / key positions inside an attention block, B blocks.

Parameter tree (`init_params`, `read_vision_params`), layers stacked [L, ...] and run under `lax.scan`:

    patch_embed: {patch_conv [K, D], ln_pre: {scale [D]}}
    layers:      {attention_norm: {scale}, attention: {q_proj, k_proj, v_proj [D, N, H], o_proj [N, H, D]},
                  ffn_norm: {scale}, feed_forward: {gate_proj, up_proj [D, F], down_proj [F, D]}}
    projector:   {norm: {scale [D]}, merging_layer [W, D, D], linear_1 [D, T], linear_2 [T, T]
                  (+ linear_1_bias [T], linear_2_bias [T] with `multimodal_projector_bias`)}
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import ACTIVATIONS, check_activation
from .model import apply_rope
from .weights.quant import FP8_DTYPE_NAMES

log = logging.getLogger(__name__)

Array = jax.Array
_NEG_INF = -1e30
PAD_SEGMENT = 2**30
"""Segment id of padding rows in a packed sequence (larger than any image index, so ids stay sorted)."""

VISION_RULES: dict[str, str | None] = {
    "vision_layers": None,
    "vision_patch": None,
    "vision_embed": None,
    "vision_norm": None,
    "vision_heads": "tensor",
    "vision_head_dim": None,
    "vision_mlp": "tensor",
    "vision_window": None,
    "vision_merged": None,
    "vision_proj": "tensor",
    "embed": None,
}
"""Suggested logical axis -> mesh axis entries for the vision parameters (merge into `sharding.RULES`).
The tower is small (~0.4 B parameters for the real config): replicating everything also works."""


# ------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Architecture of the Pixtral tower + Mistral 3 projector (hashable: usable as a jit static argument).

    Read from an HF `mistral3` config (`from_hf_dict`: the `vision_config` block plus the top-level
    `spatial_merge_size`, `projector_hidden_act`, `multimodal_projector_bias`, `vision_feature_layer`,
    `image_token_index` and `text_config.hidden_size` / `rms_norm_eps`) or from Mistral's native
    `params.json` (`from_mistral_params`). `image_break_token_index` / `image_end_token_index` are not
    in HF configs (they live in the tokenizer); the defaults are tekken's `[IMG_BREAK]`=12, `[IMG_END]`=13.
    """

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 1540
    num_channels: int = 3
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int = -1
    image_token_index: int = 10
    image_break_token_index: int = 12
    image_end_token_index: int = 13
    text_hidden_size: int = 4096
    projector_norm_eps: float = 1e-6
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        """Pixtral's attention always uses hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_patch_size(self) -> int:
        """Pixels per side of one image token: patch_size * spatial_merge_size (28 for the real model)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def patch_dim(self) -> int:
        """K = C * p * p: pixels per patch (the patch_conv input)."""
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def feature_layers(self) -> int:
        """How many tower layers run: hidden state index `vision_feature_layer` of [embeddings, layer 1..L]."""
        f = self.vision_feature_layer
        return self.num_hidden_layers + 1 + f if f < 0 else f

    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "image_size", "num_channels", "spatial_merge_size", "text_hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                             f"'num_attention_heads' ({self.num_attention_heads})")
        if self.head_dim % 4:
            raise ValueError(f"vision head dim hidden_size / num_attention_heads = {self.head_dim} must be a multiple "
                             "of 4 (2-D rope splits it into row and column halves of rotation pairs)")
        for name in ("hidden_act", "projector_hidden_act"):
            check_activation(name, getattr(self, name))
        if not isinstance(self.vision_feature_layer, int) or isinstance(self.vision_feature_layer, bool):
            raise ValueError(f"config field 'vision_feature_layer' must be an integer, got {self.vision_feature_layer!r}")
        if not 0 <= self.feature_layers <= self.num_hidden_layers:
            raise ValueError(f"config field 'vision_feature_layer' ({self.vision_feature_layer}) is out of range for "
                             f"{self.num_hidden_layers} layers (-{self.num_hidden_layers + 1}..{self.num_hidden_layers})")
        for name in ("rope_theta", "projector_norm_eps", "norm_eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"config field {name!r} must be positive, got {getattr(self, name)!r}")

    # ----------------------------------------------------------------------------------------- readers
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """From an HF `mistral3` config dict (`config.json` of `Mistral3ForConditionalGeneration`).

        ValueError naming the field for missing or inconsistent fields; a config without `vision_config`
        (a text-only checkpoint) raises too.
        """
        if d.get("model_type", "mistral3") != "mistral3":
            raise ValueError(f"config field 'model_type' must be 'mistral3' for a vision model, got {d.get('model_type')!r}")
        v = d.get("vision_config")
        if not isinstance(v, dict):
            raise ValueError("config field 'vision_config' is missing (a text-only checkpoint has no vision tower)")
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise ValueError("config field 'text_config' is missing")
        if v.get("model_type", "pixtral") != "pixtral":
            raise ValueError(f"config field 'vision_config.model_type' must be 'pixtral', got {v.get('model_type')!r}")

        def need(block: dict[str, Any], prefix: str, name: str) -> Any:
            if block.get(name) is None:
                raise ValueError(f"config field '{prefix}{name}' is missing")
            return block[name]

        kwargs: dict[str, Any] = {n: need(v, "vision_config.", n) for n in
                                  ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        for name in ("patch_size", "image_size"):
            kwargs[name] = _square(need(v, "vision_config.", name), f"vision_config.{name}")
        kwargs["num_channels"] = v.get("num_channels", 3)
        kwargs["hidden_act"] = v.get("hidden_act", "gelu")
        heads, hidden = kwargs["num_attention_heads"], kwargs["hidden_size"]
        if v.get("head_dim") is not None and isinstance(heads, int) and heads > 0 and v["head_dim"] != hidden // heads:
            raise ValueError(f"config field 'vision_config.head_dim' ({v['head_dim']}) must equal hidden_size // "
                             f"num_attention_heads ({hidden // heads}): Pixtral's attention uses the latter")
        rope = dict(v.get("rope_parameters") or v.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "axial"))
        if rope_type not in ("axial", "default"):
            raise ValueError(f"config field 'vision_config.rope_parameters.rope_type' must be 'axial', got {rope_type!r}")
        kwargs["rope_theta"] = float(rope.get("rope_theta", v.get("rope_theta", 10000.0)))

        layer = d.get("vision_feature_layer", -1)
        if isinstance(layer, (list, tuple)):
            if len(layer) != 1:
                raise ValueError(f"config field 'vision_feature_layer' ({layer!r}): several feature layers are not "
                                 "supported (Mistral 3's projector norm and patch merger take one layer's features)")
            layer = layer[0]
        kwargs.update(
            spatial_merge_size=d.get("spatial_merge_size", 2),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=bool(d.get("multimodal_projector_bias", False)),
            vision_feature_layer=layer,
            image_token_index=d.get("image_token_index", d.get("image_token_id", 10)),
            text_hidden_size=need(t, "text_config.", "hidden_size"),
            projector_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        )
        return cls(**kwargs)

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any]) -> VisionConfig:
        """From Mistral's native `params.json`: the `vision_encoder` block (or `multimodal.vision_encoder_args`)
        plus the text `dim` / `norm_eps`.

        Guessed from vLLM's / mistral-inference's `VisionEncoderArgs` and transformers' mistral3 converter:
        the tower MLP is SiLU-gated and the adapter GELU (exact); `adapter_bias` defaults to False as in
        transformers' converter; `mm_projector_id` must be "patch_merge" and `add_pre_mm_projector_layer_norm`
        true (the Mistral 3 projector); `image_size` is the largest image side (`max_image_size` if given).
        """
        v = params.get("vision_encoder")
        if v is None:
            mm = params.get("multimodal") or {}
            v = mm.get("vision_encoder_args")
            if v is not None:
                v = {**{k: x for k, x in mm.items() if k != "vision_encoder_args"}, **v}
        if not isinstance(v, dict):
            raise ValueError("params field 'vision_encoder' is missing (a text-only checkpoint has no vision tower)")

        def need(block: dict[str, Any], prefix: str, name: str) -> Any:
            if block.get(name) is None:
                raise ValueError(f"params field '{prefix}{name}' is missing")
            return block[name]

        merge = v.get("spatial_merge_size", 1)
        projector = v.get("mm_projector_id", "patch_merge" if merge > 1 else "")
        if projector != "patch_merge":
            raise ValueError(f"params field 'vision_encoder.mm_projector_id' must be 'patch_merge' (Mistral 3), got {projector!r}")
        if not v.get("add_pre_mm_projector_layer_norm", True):
            raise ValueError("params field 'vision_encoder.add_pre_mm_projector_layer_norm' must be true (Mistral 3)")
        return cls(
            hidden_size=need(v, "vision_encoder.", "hidden_size"),
            num_hidden_layers=need(v, "vision_encoder.", "num_hidden_layers"),
            num_attention_heads=need(v, "vision_encoder.", "num_attention_heads"),
            intermediate_size=need(v, "vision_encoder.", "intermediate_size"),
            patch_size=_square(need(v, "vision_encoder.", "patch_size"), "vision_encoder.patch_size"),
            image_size=_square(v.get("max_image_size") or need(v, "vision_encoder.", "image_size"), "vision_encoder.image_size"),
            num_channels=v.get("num_channels", 3),
            rope_theta=float(v.get("rope_theta", 10000.0)),
            hidden_act="silu",
            spatial_merge_size=merge,
            projector_hidden_act="gelu",
            multimodal_projector_bias=bool(v.get("adapter_bias", False)),
            vision_feature_layer=-1,
            image_token_index=v.get("image_token_id", 10),
            image_break_token_index=v.get("image_break_token_id", 12),
            image_end_token_index=v.get("image_end_token_id", 13),
            text_hidden_size=need(params, "", "dim"),
            projector_norm_eps=float(params.get("norm_eps", 1e-5)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """Our own layout (`to_dict`); an HF mistral3 dict (with `vision_config`) is also accepted."""
        if "vision_config" in d:
            return cls.from_hf_dict(d)
        from .config import from_fields

        return from_fields(cls, d)


def _square(x: Any, field: str) -> int:
    """An int, or a [n, n] pair (HF allows per-axis sizes; Pixtral uses square ones)."""
    if isinstance(x, (list, tuple)):
        if len(x) != 2 or x[0] != x[1]:
            raise ValueError(f"config field {field!r} must be one integer or a square pair, got {x!r}")
        x = x[0]
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"config field {field!r} must be an integer, got {x!r}")
    return x


# -------------------------------------------------------------------------------------------- rope
def rope_inv_freq(vcfg: VisionConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32) as HF's `PixtralVisionRotaryEmbedding`: the first H/4 rotate
    with the patch row (inv_freq[0::2]), the last H/4 with the column (inv_freq[1::2])."""
    h = vcfg.head_dim
    base = np.float32(vcfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h))
    inv = (1.0 / base).astype(np.float32)
    return np.concatenate([inv[0::2], inv[1::2]])


def rope_cos_sin(vcfg: VisionConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin [S, H/2] (float32) for patch positions [S, 2] = (row, column)."""
    inv = rope_inv_freq(vcfg)
    q = len(inv) // 2
    p = positions.astype(jnp.float32)
    angles = jnp.concatenate([p[:, :1] * inv[:q], p[:, 1:2] * inv[q:]], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


# --------------------------------------------------------------------------------------- attention
def block_attention(q: Array, k: Array, v: Array, segments: Array, scale: float, block: int = 1024) -> Array:
    """Softmax attention of every row over the rows of the same segment (image).

    q, k, v [S, N, H]; segments [S] int -> [S, N, H] (q's dtype). Scores and the softmax are float32.
    With S <= block: one masked softmax (as HF's eager attention with a block-diagonal mask). Otherwise
    S is padded to a multiple of `block` and each query block runs an online softmax over the key blocks,
    skipping (lax.cond) key blocks whose segment range does not meet the query block's: memory
    O(N * block^2), compute ~ the per-image blocks only when segments are contiguous. Query blocks run
    one after another (`lax.map`): on an accelerator a larger block (2048-4096) means fewer, bigger steps.
    """
    s, n, h = q.shape
    dtype = q.dtype
    if s <= block:
        scores = jnp.einsum("qnh,jnh->nqj", q, k, preferred_element_type=jnp.float32) * scale
        mask = segments[:, None] == segments[None, :]
        probs = jax.nn.softmax(jnp.where(mask[None], scores, _NEG_INF), axis=-1).astype(dtype)
        return jnp.einsum("nqj,jnh->qnh", probs, v)
    pad = (-s) % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, (0, pad), constant_values=PAD_SEGMENT + 1)
    nb = (s + pad) // block
    qb, kb, vb = (x.reshape(nb, block, n, h) for x in (q, k, v))
    sb = segments.reshape(nb, block)
    lo, hi = sb.min(axis=1), sb.max(axis=1)  # [B]

    def query_block(i: Array) -> Array:
        qi, si = qb[i], sb[i]

        def key_block(carry: tuple[Array, Array, Array], j: Array) -> tuple[tuple[Array, Array, Array], None]:
            def attend(carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                m, l, acc = carry  # [N, Q], [N, Q], [N, Q, H] (float32)
                sc = jnp.einsum("qnh,jnh->nqj", qi, kb[j], preferred_element_type=jnp.float32) * scale
                mask = (si[:, None] == sb[j][None, :])[None]  # [1, Q, J]
                sc = jnp.where(mask, sc, _NEG_INF)
                m_new = jnp.maximum(m, sc.max(-1))
                p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("nqj,jnh->nqh", p.astype(dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

            meets = (lo[i] <= hi[j]) & (lo[j] <= hi[i])
            return jax.lax.cond(meets, attend, lambda c: c, carry), None

        init = (jnp.full((n, block), _NEG_INF, jnp.float32), jnp.zeros((n, block), jnp.float32),
                jnp.zeros((n, block, h), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nb))
        return (acc / l[..., None]).astype(dtype).transpose(1, 0, 2)  # [Q, N, H]

    out = jax.lax.map(query_block, jnp.arange(nb))  # [B, Q, N, H]
    return out.reshape(nb * block, n, h)[:s]


# ------------------------------------------------------------------------------------------ modules
def _normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


class _VBase(nn.Module):
    """`dtype` is the compute dtype, `param_dtype` the storage dtype (vision weights are never FP8)."""

    cfg: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def weight(self, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init: Any = None) -> Array:
        """Declare parameter `name` (shape, logical axes) and return it in the compute dtype."""
        init = _normal() if init is None else init
        w = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        return jnp.asarray(w).astype(self.dtype)


class VisionRMSNorm(_VBase):
    """x * rsqrt(mean(x^2) + eps) in float32, cast to the compute dtype, times `scale` [D]."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.weight("scale", ("vision_norm",), (x.shape[-1],), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(self.dtype)


class PatchEmbed(_VBase):
    """patches [S, K] -> ln_pre(patches @ patch_conv) [S, D]."""

    @nn.compact
    def __call__(self, patches: Array) -> Array:
        c = self.cfg
        w = self.weight("patch_conv", ("vision_patch", "vision_embed"), (c.patch_dim, c.hidden_size))
        h = patches.astype(self.dtype) @ w
        return VisionRMSNorm(c, self.dtype, self.param_dtype, c.norm_eps, name="ln_pre")(h)


class VisionAttention(_VBase):
    """x [S, D], cos/sin [S, H/2], segments [S] -> [S, D]; attention within each segment (image)."""

    block: int = 1024

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, segments: Array) -> Array:
        c = self.cfg
        d, n, h = c.hidden_size, c.num_attention_heads, c.head_dim
        proj = {name: self.weight(name, ("vision_embed", "vision_heads", "vision_head_dim"), (d, n, h))
                for name in ("q_proj", "k_proj", "v_proj")}
        q, k, v = (jnp.einsum("sd,dnh->snh", x, proj[name]) for name in ("q_proj", "k_proj", "v_proj"))
        q = apply_rope(q, cos[:, None], sin[:, None], interleave=False)
        k = apply_rope(k, cos[:, None], sin[:, None], interleave=False)
        out = block_attention(q, k, v, segments, h ** -0.5, self.block)
        o = self.weight("o_proj", ("vision_heads", "vision_head_dim", "vision_embed"), (n, h, d))
        return jnp.einsum("snh,nhd->sd", out, o)


class VisionMLP(_VBase):
    """down(act(gate x) * up x); x [S, D] -> [S, D]."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        d, f = c.hidden_size, c.intermediate_size
        gate = self.weight("gate_proj", ("vision_embed", "vision_mlp"), (d, f))
        up = self.weight("up_proj", ("vision_embed", "vision_mlp"), (d, f))
        down = self.weight("down_proj", ("vision_mlp", "vision_embed"), (f, d))
        return (ACTIVATIONS[c.hidden_act](x @ gate) * (x @ up)) @ down


class VisionLayer(_VBase):
    """h + attention(attention_norm(h)), then + feed_forward(ffn_norm(h)); h [S, D]."""

    block: int = 1024

    @nn.compact
    def __call__(self, h: Array, cos: Array, sin: Array, segments: Array) -> Array:
        c = self.cfg
        sub = (c, self.dtype, self.param_dtype)
        a = VisionAttention(*sub, block=self.block, name="attention")(
            VisionRMSNorm(*sub, c.norm_eps, name="attention_norm")(h), cos, sin, segments)
        h = h + a
        return h + VisionMLP(*sub, name="feed_forward")(VisionRMSNorm(*sub, c.norm_eps, name="ffn_norm")(h))


class Projector(_VBase):
    """Mistral 3 projector: feats [S, D], merge_index [M, W] -> [M, T].

    norm -> gather each output token's s x s window (rows of `feats`, window position w = row * s + col)
    -> merged[m] = sum_w window[m, w] @ merging_layer[w] -> linear_1 (+bias) -> act -> linear_2 (+bias).
    `merging_layer` [W, D, D] is HF's `merging_layer.weight` [D, D*W] (input index d * W + w, the order of
    `torch.nn.functional.unfold`) regrouped by window position.
    """

    @nn.compact
    def __call__(self, feats: Array, merge_index: Array) -> Array:
        c = self.cfg
        d, t, w = c.hidden_size, c.text_hidden_size, c.spatial_merge_size ** 2
        x = VisionRMSNorm(c, self.dtype, self.param_dtype, c.projector_norm_eps, name="norm")(feats)
        windows = x[merge_index]  # [M, W, D]
        merging = self.weight("merging_layer", ("vision_window", "vision_embed", "vision_merged"), (w, d, d))
        h = jnp.einsum("mwd,wde->me", windows, merging)
        h = h @ self.weight("linear_1", ("vision_merged", "vision_proj"), (d, t))
        if c.multimodal_projector_bias:
            h = h + self.weight("linear_1_bias", ("vision_proj",), (t,), nn.initializers.zeros)
        h = ACTIVATIONS[c.projector_hidden_act](h)
        h = h @ self.weight("linear_2", ("vision_proj", "embed"), (t, t))
        if c.multimodal_projector_bias:
            h = h + self.weight("linear_2_bias", ("embed",), (t,), nn.initializers.zeros)
        return h


# --------------------------------------------------------------------------------- parameter tree
def _boxed(vcfg: VisionConfig, param_dtype: Any, key: Array, part: str) -> Any:
    s = 4
    feats = jnp.zeros((s, vcfg.hidden_size), jnp.float32)
    if part == "patch_embed":
        return PatchEmbed(vcfg, param_dtype=param_dtype).init(key, jnp.zeros((s, vcfg.patch_dim)))["params"]
    if part == "layer":
        cs = jnp.zeros((s, vcfg.head_dim // 2))
        return VisionLayer(vcfg, param_dtype=param_dtype).init(key, feats, cs, cs, jnp.zeros((s,), jnp.int32))["params"]
    w = vcfg.spatial_merge_size ** 2
    return Projector(vcfg, param_dtype=param_dtype).init(key, feats, jnp.zeros((1, w), jnp.int32))["params"]


def init_params(vcfg: VisionConfig, key: Array, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Random parameters (normal(0.02) weights, unit norms, zero biases); layers stacked [L, ...]."""
    k_embed, k_layers, k_proj = jax.random.split(key, 3)
    layer_keys = jax.random.split(k_layers, vcfg.num_hidden_layers)
    return {
        "patch_embed": nn.unbox(_boxed(vcfg, param_dtype, k_embed, "patch_embed")),
        "layers": nn.unbox(jax.vmap(lambda k: _boxed(vcfg, param_dtype, k, "layer"))(layer_keys)),
        "projector": nn.unbox(_boxed(vcfg, param_dtype, k_proj, "projector")),
    }


def abstract_params(vcfg: VisionConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_params, vcfg, param_dtype=param_dtype), jax.random.key(0))


def param_axes(vcfg: VisionConfig) -> dict[str, Any]:
    """Logical axis names of every parameter: a tree of tuples matching `abstract_params` (the stacked
    layers get a leading "vision_layers")."""
    def specs(part: str) -> Any:
        boxed = jax.eval_shape(functools.partial(_boxed, vcfg, jnp.float32, part=part), jax.random.key(0))
        return jax.tree_util.tree_map(tuple, nn.get_partition_spec(boxed),
                                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))

    layer = jax.tree_util.tree_map(lambda s: ("vision_layers", *s), specs("layer"), is_leaf=lambda s: isinstance(s, tuple))
    return {"patch_embed": specs("patch_embed"), "layers": layer, "projector": specs("projector")}


# ----------------------------------------------------------------------------------------- packing
@dataclasses.dataclass(frozen=True)
class PackedImages:
    """Images packed into one patch sequence (host numpy), the input of `encode` / `project`.

    patches [S, K] float32 (patch pixels in (channel, row, column) order), positions [S, 2] int32
    (row, column), segments [S] int32 (image index, `PAD_SEGMENT` for padding), merge_index [M, W] int32
    (rows of each output token's window; padding tokens point at row 0). `grids` holds each image's
    (rows, columns) of patches; `num_patches` / `num_tokens` are the unpadded S and M.
    """

    patches: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    merge_index: np.ndarray
    grids: tuple[tuple[int, int], ...]
    num_patches: int
    num_tokens: int
    spatial_merge_size: int = 1

    @property
    def token_grids(self) -> list[tuple[int, int]]:
        """(rows, columns) of image tokens (merged patches) of each image."""
        s = self.spatial_merge_size
        return [(h // s, w // s) for h, w in self.grids]

    @property
    def tokens_per_image(self) -> list[int]:
        return [r * c for r, c in self.token_grids]


def num_image_tokens(height: int, width: int, vcfg: VisionConfig) -> tuple[int, int]:
    """(rows, columns) of image tokens for a preprocessed image of height x width pixels:
    (height // (patch * merge), width // (patch * merge)). Features per image = rows * columns; the
    prompt holds rows * (columns + 1) placeholders (see `image.image_token_ids`)."""
    m = vcfg.merged_patch_size
    return height // m, width // m


def _as_images(pixel_values: Any, image_sizes: Sequence[Sequence[int]] | None, vcfg: VisionConfig) -> list[np.ndarray]:
    if isinstance(pixel_values, (np.ndarray, jax.Array)) and np.ndim(pixel_values) == 3:
        pixel_values = [pixel_values]
    images = [np.asarray(x, dtype=np.float32) for x in pixel_values]
    if image_sizes is not None:
        if len(image_sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_sizes)} image_sizes")
        images = [x[:, : int(hw[0]), : int(hw[1])] for x, hw in zip(images, image_sizes)]
    for i, x in enumerate(images):
        if x.ndim != 3 or x.shape[0] != vcfg.num_channels:
            raise ValueError(f"image {i}: pixel values must be [{vcfg.num_channels}, H, W], got shape {x.shape}")
        if x.shape[1] < vcfg.merged_patch_size or x.shape[2] < vcfg.merged_patch_size:
            raise ValueError(f"image {i}: {x.shape[1]}x{x.shape[2]} pixels is smaller than one image token "
                             f"({vcfg.merged_patch_size}x{vcfg.merged_patch_size}); preprocess it first (image.preprocess)")
    return images


def pack_images(pixel_values: Any, vcfg: VisionConfig, image_sizes: Sequence[Sequence[int]] | None = None,
                bucket: int = 1) -> PackedImages:
    """Pack preprocessed images into one patch sequence.

    pixel_values: a list of [C, H, W] arrays (any sizes), or HF's padded batch [I, C, Hmax, Wmax] with
    `image_sizes` [(h, w)] per image (each image is cropped to its size, as HF's tower does). Pixels past
    the last whole patch are dropped (HF's conv + crop); rows/columns of patches past the last whole
    s x s window are encoded but not merged (HF's unfold). S is padded up to a multiple of `bucket`
    (padding rows: zero pixels, `PAD_SEGMENT`), M to S_padded // (s*s), so the shapes depend only on
    the bucket.
    """
    p, s = vcfg.patch_size, vcfg.spatial_merge_size
    patches, positions, segments, merges, grids = [], [], [], [], []
    offset = 0
    for i, x in enumerate(_as_images(pixel_values, image_sizes, vcfg)):
        c, hgt, wid = x.shape
        hp, wp = hgt // p, wid // p
        x = x[:, : hp * p, : wp * p].reshape(c, hp, p, wp, p).transpose(1, 3, 0, 2, 4).reshape(hp * wp, c * p * p)
        patches.append(x)
        rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
        positions.append(np.stack([rows.ravel(), cols.ravel()], axis=-1))
        segments.append(np.full((hp * wp,), i))
        br, bc, ki, kj = np.meshgrid(np.arange(hp // s), np.arange(wp // s), np.arange(s), np.arange(s), indexing="ij")
        merges.append((offset + (br * s + ki) * wp + (bc * s + kj)).reshape(-1, s * s))
        grids.append((hp, wp))
        offset += hp * wp
    if not patches:
        raise ValueError("no images to pack")
    n, m = offset, sum(len(x) for x in merges)
    total = -(-n // bucket) * bucket
    pad = total - n
    patches.append(np.zeros((pad, vcfg.patch_dim), np.float32))
    positions.append(np.zeros((pad, 2), np.int64))
    segments.append(np.full((pad,), PAD_SEGMENT))
    merges.append(np.zeros((total // (s * s) - m, s * s), np.int64))
    return PackedImages(
        patches=np.concatenate(patches).astype(np.float32), positions=np.concatenate(positions).astype(np.int32),
        segments=np.concatenate(segments).astype(np.int32), merge_index=np.concatenate(merges).astype(np.int32),
        grids=tuple(grids), num_patches=n, num_tokens=m, spatial_merge_size=s,
    )


# ------------------------------------------------------------------------------------------ forward
def encode(params: dict[str, Any], vcfg: VisionConfig, patches: Array, positions: Array, segments: Array, *,
           dtype: Any = jnp.float32, attn_block: int = 1024) -> Array:
    """The vision tower: patches [S, K], positions [S, 2], segments [S] -> features [S, D] (dtype).

    Returns the hidden state after `vcfg.feature_layers` layers (the output of the last layer for the
    default `vision_feature_layer` -1; HF's `last_hidden_state`). Jittable; vcfg, dtype and attn_block static.
    """
    patches, positions, segments = jnp.asarray(patches), jnp.asarray(positions), jnp.asarray(segments)
    param_dtype = jax.tree_util.tree_leaves(params["patch_embed"])[0].dtype
    h = PatchEmbed(vcfg, dtype, param_dtype).apply({"params": params["patch_embed"]}, patches)
    cos, sin = rope_cos_sin(vcfg, positions)
    n = vcfg.feature_layers
    if n == 0:
        return h
    layers = jax.tree_util.tree_map(lambda x: x[:n], params["layers"])
    layer = VisionLayer(vcfg, dtype, param_dtype, block=attn_block)

    def body(h: Array, p: Any) -> tuple[Array, None]:
        return layer.apply({"params": p}, h, cos, sin, segments), None

    h, _ = jax.lax.scan(body, h, layers)
    return h


def project(params: dict[str, Any], vcfg: VisionConfig, feats: Array, merge_index: Array, *,
            dtype: Any = jnp.float32) -> Array:
    """The Mistral 3 projector: tower features [S, D], merge_index [M, W] -> image embeddings [M, T]."""
    param_dtype = jax.tree_util.tree_leaves(params["projector"])[0].dtype
    return Projector(vcfg, dtype, param_dtype).apply({"params": params["projector"]}, jnp.asarray(feats),
                                                     jnp.asarray(merge_index))


@functools.partial(jax.jit, static_argnames=("vcfg", "dtype", "attn_block"))
def _features(params: dict[str, Any], vcfg: VisionConfig, patches: Array, positions: Array, segments: Array,
              merge_index: Array, dtype: Any, attn_block: int) -> Array:
    feats = encode(params, vcfg, patches, positions, segments, dtype=dtype, attn_block=attn_block)
    return project(params, vcfg, feats, merge_index, dtype=dtype)


def image_features(params: dict[str, Any], vcfg: VisionConfig, pixel_values: Any,
                   image_sizes: Sequence[Sequence[int]] | None = None, *, dtype: Any = jnp.float32,
                   attn_block: int = 1024, bucket: int = 256) -> Array:
    """Image embeddings for the `[IMG]` positions: [M, T] in `dtype`, M = sum over images of rows * cols.

    pixel_values: preprocessed images (`image.preprocess`): a list of [C, H, W] arrays, or HF's padded
    [I, C, Hmax, Wmax] with `image_sizes`. Row m is image token m in prompt order (images in order, each
    row-major over its token grid) — scatter them, in order, into the `[IMG]` positions (`scatter_image_features`),
    skipping `[IMG_BREAK]` / `[IMG_END]`. Equals HF's `torch.cat(Mistral3Model.get_image_features(...).pooler_output)`.
    The packed length is padded to a multiple of `bucket` so that similar inputs share one compilation.
    """
    packed = pack_images(pixel_values, vcfg, image_sizes, bucket)
    out = _features(params, vcfg, jnp.asarray(packed.patches), jnp.asarray(packed.positions),
                    jnp.asarray(packed.segments), jnp.asarray(packed.merge_index), jnp.dtype(dtype), attn_block)
    return out[: packed.num_tokens]


def scatter_image_features(embeds: Array, input_ids: Array, features: Array, image_token_index: int) -> Array:
    """Put features [M, T] into the `[IMG]` positions of embeds [B, L, T] (input_ids [B, L]) in row-major
    (batch, then position) order, as HF's `masked_scatter`; other positions are unchanged. Jittable.

    The count of `[IMG]` tokens must equal M (check with `check_image_token_count` on the host first):
    extra `[IMG]` positions would silently reuse the last feature row.
    """
    if features.shape[0] == 0:
        return embeds
    is_img = (input_ids == image_token_index).reshape(-1)
    idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, features.shape[0] - 1)
    flat = embeds.reshape(-1, embeds.shape[-1])
    out = jnp.where(is_img[:, None], features[idx].astype(embeds.dtype), flat)
    return out.reshape(embeds.shape)


def check_image_token_count(input_ids: Any, num_features: int, image_token_index: int) -> None:
    """ValueError unless the number of `[IMG]` tokens in input_ids equals the number of feature rows."""
    n = int(np.sum(np.asarray(input_ids) == image_token_index))
    if n != num_features:
        raise ValueError(f"the prompt has {n} [IMG] tokens but the images give {num_features} image features "
                         "(more images than [IMG] slots, or a token layout that does not match the images)")


# --------------------------------------------------------------------------------- weight reading
_SCALE_SUFFIXES = ("_scale_inv", ".weight_scale", ".activation_scale", ".input_scale", ".qscale_weight", ".qscale_act")
_VISION_PREFIXES = (
    "vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
    "vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.",
)
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def is_vision_name(name: str) -> bool:
    """Whether a checkpoint tensor belongs to the vision tower or the projector (HF or native names)."""
    return name.startswith(_VISION_PREFIXES)


def vision_names(names: Iterable[str]) -> tuple[str, str]:
    """(tower prefix, projector prefix) of the naming scheme used by a checkpoint's tensor names:
    ("vision_tower.", "multi_modal_projector.") on disk, ("model.vision_tower.", "model.multi_modal_projector.")
    in memory, or ("vision_encoder.", "") for Mistral's native names. ValueError if none or several."""
    names = [n for n in names if is_vision_name(n)]
    schemes = {("model.vision_tower.", "model.multi_modal_projector."): False,
               ("vision_tower.", "multi_modal_projector."): False, ("vision_encoder.", ""): False}
    for n in names:
        if n.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            schemes[("model.vision_tower.", "model.multi_modal_projector.")] = True
        elif n.startswith(("vision_tower.", "multi_modal_projector.")):
            schemes[("vision_tower.", "multi_modal_projector.")] = True
        else:
            schemes[("vision_encoder.", "")] = True
    found = [k for k, v in schemes.items() if v]
    if not found:
        raise ValueError("the checkpoint has no vision tensors (vision_tower.* / vision_encoder.*): it is text-only")
    if len(found) > 1:
        raise ValueError(f"the checkpoint mixes vision naming schemes: {[k[0] for k in found]}")
    return found[0]


def _permute_native_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Native wq/wk rows [N*H, D] (rope on interleaved pairs) -> HF's rotate-half row order
    (transformers' `permute_for_rope`): within each head, row 2i+a moves to a*H/2 + i."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def read_vision_params(get: Callable[[str, tuple[int, ...]], np.ndarray], names: Iterable[str], vcfg: VisionConfig,
                       dtype: Any = np.float32) -> dict[str, Any]:
    """The vision parameter tree (numpy, `dtype`, our layout, layers stacked) from a checkpoint.

    get(name, shape) -> float32 numpy array, checking the shape (and dequantising FP8), e.g. `tensor_getter`;
    names: every tensor name of the checkpoint (to pick the naming scheme and to reject unexpected vision tensors).

    HF names (prefix `vision_tower.` / `model.vision_tower.`, projector `multi_modal_projector.` /
    `model.multi_modal_projector.`), HF layouts [out, in]:
      patch_conv.weight [D, C, p, p] -> patch_embed.patch_conv [K, D];  ln_pre.weight -> patch_embed.ln_pre.scale
      transformer.layers.N.attention.{q,k,v}_proj.weight [N*H, D] -> layers.attention.{q,k,v}_proj [D, N, H]
      transformer.layers.N.attention.o_proj.weight [D, N*H] -> layers.attention.o_proj [N, H, D]
      transformer.layers.N.feed_forward.{gate,up}_proj.weight [F, D] -> [D, F]; down_proj [D, F] -> [F, D]
      transformer.layers.N.{attention_norm, ffn_norm}.weight -> layers.{attention_norm, ffn_norm}.scale
      norm.weight -> projector.norm.scale;  patch_merger.merging_layer.weight [D, D*W] -> merging_layer [W, D, D]
      linear_{1,2}.weight [T, .] -> linear_{1,2} [., T];  linear_{1,2}.bias -> linear_{1,2}_bias
    Native names (transformers' mistral3 converter's table): vision_encoder.{patch_conv, ln_pre},
    vision_encoder.transformer.layers.N.{attention.w{q,k,v,o}, feed_forward.w{1,3,2} (gate, up, down),
    attention_norm, ffn_norm}, pre_mm_projector_norm, patch_merger.merging_layer, vision_language_adapter.w_in
    / w_out (= linear_1 / linear_2); native wq / wk rows are permuted from interleaved to rotate-half rope.
    ValueError names a missing, mis-shaped or unexpected vision tensor.
    """
    names = list(names)
    tower, proj = vision_names(names)
    native = tower == "vision_encoder."
    c = vcfg
    d, n, h, f, t, k = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size, c.text_hidden_size, c.patch_dim
    w = c.spatial_merge_size ** 2
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        return np.asarray(get(name, shape), dtype=np.float32)

    def lin(name: str, out: int, inp: int) -> np.ndarray:
        return read(name + ".weight", (out, inp)).T

    pre = f"{tower}transformer.layers."
    layers: list[dict[str, Any]] = []
    for i in range(c.num_hidden_layers):
        p = f"{pre}{i}."
        if native:
            a = {x: read(f"{p}attention.w{x[0]}.weight", (n * h, d)) for x in ("q_proj", "k_proj", "v_proj")}
            a["q_proj"], a["k_proj"] = _permute_native_rope(a["q_proj"], n), _permute_native_rope(a["k_proj"], n)
            o = read(f"{p}attention.wo.weight", (d, n * h))
            mlp = {"gate_proj": lin(p + "feed_forward.w1", f, d), "up_proj": lin(p + "feed_forward.w3", f, d),
                   "down_proj": lin(p + "feed_forward.w2", d, f)}
        else:
            a = {x: read(f"{p}attention.{x}.weight", (n * h, d)) for x in ("q_proj", "k_proj", "v_proj")}
            o = read(f"{p}attention.o_proj.weight", (d, n * h))
            mlp = {x: lin(p + "feed_forward." + x, f, d) for x in ("gate_proj", "up_proj")}
            mlp["down_proj"] = lin(p + "feed_forward.down_proj", d, f)
        attn = {x: a[x].T.reshape(d, n, h) for x in ("q_proj", "k_proj", "v_proj")}
        attn["o_proj"] = o.T.reshape(n, h, d)
        layers.append({
            "attention_norm": {"scale": read(p + "attention_norm.weight", (d,))},
            "attention": attn,
            "ffn_norm": {"scale": read(p + "ffn_norm.weight", (d,))},
            "feed_forward": mlp,
        })
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)

    patch = read(tower + "patch_conv.weight", (d, c.num_channels, c.patch_size, c.patch_size)).reshape(d, k).T
    names_p = ({"norm": "pre_mm_projector_norm", "merge": "patch_merger.merging_layer", "l1": "vision_language_adapter.w_in",
                "l2": "vision_language_adapter.w_out"} if native else
               {"norm": proj + "norm", "merge": proj + "patch_merger.merging_layer", "l1": proj + "linear_1",
                "l2": proj + "linear_2"})
    merging = read(names_p["merge"] + ".weight", (d, d * w)).reshape(d, d, w).transpose(2, 1, 0)
    projector: dict[str, Any] = {
        "norm": {"scale": read(names_p["norm"] + ".weight", (d,))},
        "merging_layer": merging,
        "linear_1": lin(names_p["l1"], t, d),
        "linear_2": lin(names_p["l2"], t, t),
    }
    if c.multimodal_projector_bias:
        projector["linear_1_bias"] = read(names_p["l1"] + ".bias", (t,))
        projector["linear_2_bias"] = read(names_p["l2"] + ".bias", (t,))
    out = {
        "patch_embed": {"patch_conv": patch, "ln_pre": {"scale": read(tower + "ln_pre.weight", (d,))}},
        "layers": stacked,
        "projector": projector,
    }
    extra = sorted(x for x in names if is_vision_name(x) and x not in used and not x.endswith(_SCALE_SUFFIXES))
    if extra:
        layer_ids = [int(m.group(1)) for x in extra if (m := _LAYER_RE.search(x))]
        hint = (f" (the vision config has {c.num_hidden_layers} layers)"
                if layer_ids and max(layer_ids) >= c.num_hidden_layers else "")
        if not c.multimodal_projector_bias and any(x.endswith(".bias") for x in extra):
            hint += " (the config says multimodal_projector_bias = false)"
        raise ValueError(f"unexpected vision tensor {extra[0]!r}{hint}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), out)


def tensor_getter(index: Any, where: str, fp8_block: tuple[int, int] = (128, 128)) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """get(name, shape) over a `safetensors_io.TensorIndex`: checks the shape and a float (or FP8) dtype,
    returns float32 (FP8 dequantised with its `weight_scale_inv` / `qscale_weight`). For `read_vision_params`,
    since `hf.HFReader` deliberately skips vision tensors."""
    from .hf import dequantize_fp8

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in index:
            raise ValueError(f"{where}: missing tensor {name!r}")
        actual = tuple(index.shape(name))
        if actual != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {actual}, expected {tuple(shape)}")
        dt = np.dtype(index.dtype(name))
        if dt.name in FP8_DTYPE_NAMES:
            base = name[: -len(".weight")] if name.endswith(".weight") else name
            for cand in (name + "_scale_inv", base + ".weight_scale_inv", base + ".qscale_weight"):
                if cand in index:
                    return dequantize_fp8(index.get(name), np.asarray(index.get(cand), np.float32), name, fp8_block)
            raise ValueError(f"{where}: FP8 tensor {name!r} has no scale")
        if dt.name not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"{where}: tensor {name!r} has unsupported dtype {dt.name}, expected a float dtype")
        return np.asarray(index.get(name), dtype=np.float32)

    return get


def count_params(vcfg: VisionConfig) -> int:
    """Number of vision parameters (tower + projector)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(vcfg)))
