"""The text decoder's forward pass: embed, the stacked layer groups under `lax.scan`, final norm, lm_head.

Einsum letters: B batch, T query tokens, S key positions, D hidden, N heads, Q q_lora rank,
L kv_lora rank (the latent), P nope dims, R rope dims, H = P + R, V value dims, E experts, K top-k,
F expert hidden, I dense hidden, X vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules, batch_spec
from .vision import scatter_image_features
from .attention import write_tokens, write_valid
from .cache import Cache, LayerCache
from .layers import ATTN_BLOCK, decoder_layer, rms_norm
from .moe import resolve_moe_backend
from .splash import resolve_attn_backend
from .params import layer_groups
from .rope import llama4_query_scale, rope_cos_sin

Array = jax.Array
ROUTED_EXPERTS = ("experts_gate", "experts_up", "experts_down")


def forward(
    params: dict[str, Any],
    cfg: Mistral4Config,
    input_ids: Array,
    positions: Array,
    key_valid: Array,
    *,
    cache: Cache | None = None,
    index: Array | int = 0,
    decode: bool = False,
    last_only: bool = False,
    logits_at: Array | None = None,
    dtype: Any = jnp.float32,
    mesh: Any = None,
    image_features: Array | None = None,
    image_token_index: int = 10,
    moe_backend: str = "auto",
    rules: ShardingRules = DEFAULT_RULES,
    attn_block: int = ATTN_BLOCK,
    attn_backend: str = "auto",
    remat: bool = False,
) -> tuple[Array, Array | None, Cache | None]:
    """The decoder: embed, layer groups, final norm, lm_head.

    input_ids, positions [B, T] int; key_valid [B, T] bool (False = padding).
    Without `decode` the T tokens attend among themselves (prefill); if `cache` is given they are also
    written into it at slots index..index+T-1. With `decode` they attend to the cache's valid slots before
    `index` (absorbed MLA) and causally to themselves, then are written at `index`. That serves a decode step
    (T = 1) and equally a chunk of prompt continuing a cached prefix (chunked prefill of a long prompt; a chat
    turn prefilled after the conversation so far): the chunk reads only the cache blocks before it, so a
    prompt's attention memory grows with chunk x context, not context^2. On a mesh whose `rules` split the
    cache's slots ("cache_seq"), each chip attends over its own slots (`attention.latent_attention`).
    Layer groups stored stacked run under `lax.scan`; stored as lists (see `unstack_layers`) they run as an
    unrolled loop.
    `image_features` [M, D] (prefill only): rows replace, in order, the embeddings of the tokens equal to
    `image_token_index` (`[IMG]`), batch row by batch row, as HF's `masked_scatter`; rows past the number
    of `[IMG]` tokens are ignored (so M may be padded to a bucket). None: the text-only path.
    `last_only`: logits of the last token only; `logits_at` [B] int: of token `logits_at[b]` of each row
    only (the last real token of a right-padded chunk). Both give logits [B, 1, X].
    `moe_backend`: the routed experts' kernel (`resolve_moe_backend`: "auto" = "loop" on CPU, "ragged"
    on TPU/GPU). `rules`: the layout of the activations and the expert-parallel MoE on `mesh`.
    `attn_block`: keys per attention block (`layers.mla`): attention temporaries grow with T x attn_block,
    not with T x S (no [B, T, S] mask is built either). `attn_backend`: the prefill attention's kernel
    (`splash.resolve_attn_backend`: "auto" = the fused "splash" kernel on TPU, else "xla", the blockwise one).
    `remat` (training, no cache): each layer's activations are recomputed in the backward pass
    (`jax.checkpoint` per layer), so only the layer inputs stay alive between the passes.
    Returns (logits [B, T or 1, X] float32, expert ids [moe layers, B, T, K] or None, updated cache).
    """
    if attn_block < 1:
        raise ValueError(f"attn_block must be a positive number of keys, got {attn_block}")
    embed = params["embed"]
    h = jnp.take(embed, input_ids, axis=0).astype(dtype)
    if image_features is not None:
        h = scatter_image_features(h, input_ids, image_features, image_token_index)
    if mesh is not None:
        h = jax.lax.with_sharding_constraint(h, jax.sharding.NamedSharding(mesh, batch_spec(mesh, h.shape[0], 3, rules)))
    seq_len = jnp.max(jnp.where(key_valid, positions, 0), axis=-1) + 1  # [B] (dynamic and longrope rope)
    cos, sin = rope_cos_sin(cfg, positions, seq_len)
    qscale = llama4_query_scale(cfg, positions)
    groups: dict[str, LayerCache] = {}
    old_valid = None if cache is None else cache.valid  # the attention reads the cache as it was (slots < index)
    if cache is not None:
        cache = cache.replace(valid=write_valid(cache.valid, key_valid, index, mesh, rules))
    expert_ids = None
    moe_backend = resolve_moe_backend(moe_backend, mesh)
    attn_backend = resolve_attn_backend(attn_backend, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, mesh)
    for name, _, moe in layer_groups(cfg):
        group_cache = None if cache is None else cache.groups[name]

        def layer(p, h, gc, i, expert_layer=None):  # -> (h, expert ids, gc with layer i's new tokens written)
            def run(p, h, expert_layer):
                return decoder_layer(p, h, cos, sin, qscale, key_valid, cfg, dtype, mesh, moe_backend,
                                     None if gc is None or not decode else jax.tree.map(lambda x: x[i], gc),
                                     old_valid, index, decode, rules, attn_block, expert_layer, attn_backend)
            h, (ids, new) = (jax.checkpoint(run) if remat and gc is None else run)(p, h, expert_layer)
            return h, ids, None if gc is None else write_tokens(gc, new, i, index, mesh, rules)

        stacked_experts = {} if not moe or isinstance(params[name], list) else {
            k: v for k, v in params[name]["moe"].items() if k in ROUTED_EXPERTS}

        def body(carry, xs):  # the group cache rides in the carry, written t slots per layer in place
            h, gc = carry
            p, i = xs
            if stacked_experts:  # the routed experts stay whole [Lg, E, ...] (see `routed_experts`' `layer`)
                p = {**p, "moe": {**p["moe"], **stacked_experts}}
            h, ids, gc = layer(p, h, gc, i, i if stacked_experts else None)
            return (h, gc), ids

        if isinstance(params[name], list):  # unrolled
            all_ids = []
            for i, p in enumerate(params[name]):
                h, ids, group_cache = layer(p, h, group_cache, i)
                all_ids.append(ids)
            ids = jnp.stack(all_ids) if moe else None
        else:
            n = len(jax.tree.leaves(params[name])[0])
            xs = params[name]
            if stacked_experts:
                xs = {**xs, "moe": {k: v for k, v in xs["moe"].items() if k not in ROUTED_EXPERTS}}
            (h, group_cache), ids = jax.lax.scan(body, (h, group_cache), (xs, jnp.arange(n)))
        groups[name] = group_cache
        expert_ids = ids if moe else expert_ids
    if cache is not None:
        cache = cache.replace(groups=groups)
    if last_only:
        h = h[:, -1:]
    elif logits_at is not None:
        h = jnp.take_along_axis(h, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    h = rms_norm(params["final_norm"], h, cfg.rms_norm_eps, dtype)
    head = embed if cfg.tie_word_embeddings else params["lm_head"]  # [X, D]: XLA:CPU's small-batch matmul is
    # faster against this (HF's) layout than against [D, X]
    return jnp.einsum("btd,xd->btx", h, head.astype(dtype)).astype(jnp.float32), expert_ids, cache
