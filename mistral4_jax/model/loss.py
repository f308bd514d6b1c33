"""The language-modelling loss, as transformers computes it for `Mistral4ForCausalLM(labels=...)`.

    loss, tokens = causal_lm_loss(params, cfg, input_ids, labels, attention_mask)   # jittable, differentiable

Next-token cross-entropy: the logits at position t predict ``labels[t + 1]`` (the labels are shifted inside,
as transformers' ``ForCausalLMLoss`` does), positions whose shifted label is ``IGNORE_INDEX`` (-100) do not
count, and the loss is the mean over the tokens that do (0 when none does; ``tokens`` says how many). Logits
are float32 whatever the compute dtype. The routed experts run the "ragged" backend (grouped matmuls):
reverse-mode differentiation cannot go through the "loop" backend's run-time trip counts; the router is the
inference router (every token reaches its top-k experts, none is dropped).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules
from .decoder import forward

Array = jax.Array

IGNORE_INDEX = -100


def cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """(mean next-token cross-entropy, number of counted tokens) of logits [B, T, V] and labels [B, T] (not yet
    shifted; `IGNORE_INDEX` = not counted)."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)  # labels[t + 1]
    counted = targets != IGNORE_INDEX
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    tokens = counted.sum()
    return jnp.where(counted, nll, 0.0).sum() / jnp.maximum(tokens, 1), tokens


def causal_lm_loss(params: dict[str, Any], cfg: Mistral4Config, input_ids: Array, labels: Array,
                   attention_mask: Array | None = None, *, dtype: Any = jnp.float32, mesh: Any = None,
                   rules: ShardingRules = DEFAULT_RULES, remat: bool = False) -> tuple[Array, Array]:
    """(loss, counted tokens) of input_ids, labels [B, T] (int; `IGNORE_INDEX` where nothing is learned) and
    attention_mask [B, T] (1 = token, 0 = padding; None = all tokens). Positions count the real tokens before
    each one, so right padding (the usual for training) gives the positions transformers uses. `remat`: recompute
    each layer's activations in the backward pass (`forward`'s). Weights may be `weights.lora.LoraWeight`s."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    logits, _, _ = forward(params, cfg, input_ids, positions, attention_mask.astype(bool), dtype=dtype, mesh=mesh,
                           moe_backend="ragged", rules=rules, remat=remat)
    return cross_entropy(logits, labels)
