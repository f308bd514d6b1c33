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

Parameter tree (`init_params`, `weights.vision.read_vision_params`), layers stacked [L, ...] and run under `lax.scan`:

    patch_embed: {patch_conv [K, D], ln_pre: {scale [D]}}
    layers:      {attention_norm: {scale}, attention: {q_proj, k_proj, v_proj [D, N, H], o_proj [N, H, D]},
                  ffn_norm: {scale}, feed_forward: {gate_proj, up_proj [D, F], down_proj [F, D]}}
    projector:   {norm: {scale [D]}, merging_layer [W, D, D], linear_1 [D, T], linear_2 [T, T]
                  (+ linear_1_bias [T], linear_2_bias [T] with `multimodal_projector_bias`)}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..weights.quant import is_fp8
from .layers import rms_norm
from .rope import apply_rope

from ..activations import ACTIVATIONS
from .vision_config import VisionConfig
from .vision_packing import PAD_SEGMENT, pack_images

Array = jax.Array
_NEG_INF = -1e30
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
"""Suggested logical axis -> mesh axis entries for the vision parameters
(`Mistral4(..., rules=sharding.DEFAULT_RULES.replace(**VISION_RULES))`).
The tower is small (~0.4 B parameters for the real config): replicating everything also works."""



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
def vision_dtype(dtype: Any) -> np.dtype:
    """Storage dtype of the vision tower and projector for text weights in `dtype`: bfloat16 when the text
    weights are FP8 (the released checkpoint keeps vision in bf16; vision weights are never FP8), else `dtype`."""
    return jnp.dtype(jnp.bfloat16) if is_fp8(dtype) else jnp.dtype(dtype)


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


class _RMSNorm(_VBase):
    """The text model's `layers.rms_norm` with its `scale` [D] declared here (logical axis "vision_norm")."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("vision_norm",)), (x.shape[-1],),
                           self.param_dtype)
        return rms_norm({"scale": scale}, x, self.eps, self.dtype)


def _norm(parent: _VBase, eps: float, name: str) -> _RMSNorm:
    """An RMSNorm child of `parent` (its config and dtypes)."""
    return _RMSNorm(parent.cfg, parent.dtype, parent.param_dtype, eps=eps, name=name)


class PatchEmbed(_VBase):
    """patches [S, K] -> ln_pre(patches @ patch_conv) [S, D]."""

    @nn.compact
    def __call__(self, patches: Array) -> Array:
        c = self.cfg
        w = self.weight("patch_conv", ("vision_patch", "vision_embed"), (c.patch_dim, c.hidden_size))
        h = patches.astype(self.dtype) @ w
        return _norm(self, c.norm_eps, "ln_pre")(h)


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
        attention = VisionAttention(*sub, block=self.block, name="attention")
        h = h + attention(_norm(self, c.norm_eps, "attention_norm")(h), cos, sin, segments)
        return h + VisionMLP(*sub, name="feed_forward")(_norm(self, c.norm_eps, "ffn_norm")(h))


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
        x = _norm(self, c.projector_norm_eps, "norm")(feats)
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



def count_params(vcfg: VisionConfig) -> int:
    """Number of vision parameters (tower + projector)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(vcfg)))
