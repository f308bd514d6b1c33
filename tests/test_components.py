"""Unit tests of rope, YaRN, the Llama-4 query scale and the router against transformers' own functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mistral4 import modeling_mistral4 as ref

from mistral4_jax import Mistral4Config
from mistral4_jax.model import abstract_params, apply_rope, llama4_query_scale, param_axes, rope_cos_sin, rope_inv_freq, route
from helpers import TINY, hf_config

REAL = Mistral4Config()


@pytest.mark.parametrize(
    "cfg",
    [REAL, TINY, TINY.replace(original_max_position_embeddings=4, rope_factor=8.0, mscale=0.7, beta_fast=16.0),
     TINY.replace(beta_fast=4.0, beta_slow=2.0, rope_truncate=False)],
    ids=["real", "tiny", "tiny_yarn_mscale", "untruncated"],
)
def test_inv_freq_and_attention_factor_match_hf(cfg):
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(cfg))
    ours, our_factor = rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, inv.numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(factor, rel=1e-7)


def test_default_rope_is_plain_theta_over_rope_dims():
    """rope_type "default" (HF's own default path rotates head_dim, which Mistral 4 cannot use) = theta^(-2i/R)."""
    cfg = TINY.replace(rope_type="default")
    inv, factor = rope_inv_freq(cfg)
    r = cfg.qk_rope_head_dim
    np.testing.assert_allclose(inv, cfg.rope_theta ** (-np.arange(0, r, 2) / r), rtol=1e-6)
    assert factor == 1.0 and cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_hf_layouts(interleave):
    cfg = TINY.replace(rope_interleave=interleave, original_max_position_embeddings=4, rope_factor=8.0)
    b, n, t, r = 2, 3, 11, cfg.qk_rope_head_dim
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(b, n, t, r)).astype(np.float32), rng.normal(size=(b, 1, t, r)).astype(np.float32)
    pos = np.stack([np.arange(t), np.arange(t) + 5])
    rot = ref.Mistral4RotaryEmbedding(hf_config(cfg))
    cos, sin = rot(torch.tensor(q), torch.tensor(pos))
    fn = ref.apply_rotary_pos_emb_interleave if interleave else ref.apply_rotary_pos_emb
    q_ref, k_ref = fn(torch.tensor(q), torch.tensor(k), cos, sin)
    c, s = rope_cos_sin(cfg, jnp.asarray(pos))  # [B, T, R/2]
    q_ours = apply_rope(jnp.asarray(q), c[:, None], s[:, None], interleave)
    k_ours = apply_rope(jnp.asarray(k), c[:, None], s[:, None], interleave)
    np.testing.assert_allclose(np.asarray(q_ours), q_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(k_ours), k_ref.numpy(), atol=1e-5)


def test_llama4_query_scale_matches_hf():
    cfg = REAL
    pos = np.array([[0, 8191, 8192, 16383, 16384, 100000, 1048575]])
    theirs = ref.get_llama_4_attn_scale(torch.tensor(pos), cfg.llama_4_scaling_beta, cfg.original_max_position_embeddings)
    ours = llama4_query_scale(cfg, jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(ours), theirs[:, 0, :, 0].numpy(), rtol=1e-6)
    assert float(ours[0, 0]) == 1.0 and float(ours[0, 2]) > 1.0


@pytest.mark.parametrize(
    "fields",
    [{}, {"n_group": 4, "topk_group": 2}, {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
     {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 8, "topk_group": 3}],
    ids=["plain", "grouped", "unnormalised", "grouped16"],
)
def test_router_matches_hf(fields):
    cfg = TINY.replace(**fields)
    router = ref.Mistral4TopkRouter(hf_config(cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        logits, w_ref, i_ref = router(x)
    w, i = route(jnp.asarray(logits.numpy()), cfg)
    order_ref, order = np.argsort(i_ref.numpy(), -1), np.argsort(np.asarray(i), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(i), order, -1), np.take_along_axis(i_ref.numpy(), order_ref, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_ref.numpy(), order_ref, -1), rtol=1e-5, atol=1e-7)


def test_routed_experts_never_drop_tokens_under_imbalance():
    """All tokens routed to the same two experts (several full chunks plus a padded last one) or spread
    out; the result must stay exact."""
    from mistral4_jax.model import EXPERT_CHUNK_ROWS, routed_experts

    rng = np.random.default_rng(0)
    t, k, e, d, f = 2 * EXPERT_CHUNK_ROWS + 17, 2, 8, 16, 8  # last chunk: 17 rows, in the 32-row tier
    x = rng.normal(size=(t, d)).astype(np.float32)
    gate, up = rng.normal(size=(e, d, f)).astype(np.float32), rng.normal(size=(e, d, f)).astype(np.float32)
    down = rng.normal(size=(e, f, d)).astype(np.float32)
    w = rng.uniform(size=(t, k)).astype(np.float32)

    def dense(ids):
        out = np.zeros((t, d), np.float32)
        for ti in range(t):
            for ki in range(k):
                ex = ids[ti, ki]
                h = x[ti] @ gate[ex]
                out[ti] += w[ti, ki] * ((h / (1 + np.exp(-h))) * (x[ti] @ up[ex])) @ down[ex]
        return out

    for ids in (np.tile([[3, 5]], (t, 1)), rng.permuted(np.tile(np.arange(e), (t, 1)), axis=1)[:, :k]):
        got = jax.jit(routed_experts)(x, ids.astype(np.int32), w, gate, up, down)
        np.testing.assert_allclose(np.asarray(got), dense(ids), rtol=1e-4, atol=1e-4)
    # decode-sized input (small row tiers)
    got = routed_experts(x[:2], ids[:2].astype(np.int32), w[:2], gate, up, down)
    np.testing.assert_allclose(np.asarray(got), dense(ids)[:2], rtol=1e-4, atol=1e-4)


def test_real_config_shapes_and_logical_axes():
    """The full 119B parameter tree, abstractly (nothing allocated): shapes, count and axis names."""
    params = abstract_params(REAL, jnp.bfloat16)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert 118e9 < count < 120e9, count
    moe = params["layers_moe"]["moe"]
    assert moe["experts_gate"].shape == (36, 128, 4096, 2048)
    assert moe["experts_down"].shape == (36, 128, 2048, 4096)
    axes = param_axes(REAL, jnp.bfloat16)
    assert jax.tree_util.tree_structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree_util.tree_structure(params)
    assert tuple(axes["layers_moe"]["moe"]["experts_gate"]) == ("layers", "experts", "embed", "expert_mlp")
    assert tuple(axes["layers_moe"]["attn"]["q_b_proj"]) == ("layers", "q_lora", "heads", "qk_dim")
    assert tuple(axes["lm_head"]) == ("vocab", "embed")
    for leaf, spec in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(spec) == len(leaf.shape) and all(a is not None for a in spec), spec
