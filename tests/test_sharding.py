"""Sharded inference on 8 simulated CPU devices: every mesh gives the single-device logits and tokens,
the experts are really split, and bad meshes fail before any compilation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mistral4_jax
from mistral4_jax import Mistral4
from mistral4_jax.weights import hf
from mistral4_jax.model.attention import seq_axis
from mistral4_jax.sharding import DEFAULT_RULES, make_mesh, parse_mesh
from helpers import TINY, hf_greedy_batch, make_hf_model, save_hf

CFG = TINY.replace(num_attention_heads=8, first_k_dense_replace=1, num_hidden_layers=3,
                   hidden_act="gelu")  # the activation reaches the experts under shard_map too
MESHES = ["data=1,expert=8,tensor=1", "data=1,expert=1,tensor=8", "data=2,expert=2,tensor=2"]
"""Each axis alone at full size and all three at once; expert=4,tensor=2 is the greedy test's mesh."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    assert jax.device_count() == 8
    d = tmp_path_factory.mktemp("shard")
    ref = make_hf_model(CFG, seed=21)
    save_hf(ref, str(d))
    single = mistral4_jax.load(d)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, size=(8, 12))
    prompts = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (5, 13, 9)]
    tokens = [r.tokens for r in single.generate(prompts, max_new_tokens=8, stop_token_ids=[CFG.vocab_size - 1])]
    return hf.read_params(str(d), CFG), ids, single.logits(ids), prompts, tokens, ref


@pytest.mark.parametrize("spec", MESHES)
def test_mesh_matches_single_device(reference, spec):
    """Prompts and logits in chunks of 6 tokens (the single-device reference runs them in one piece): the cache's
    slots split over `expert` (5 per shard for expert=8, 20 for expert=2), chunks that straddle shards or hold
    more slots than one shard, left padding."""
    params, ids, logits, prompts, tokens, _ = reference
    model = Mistral4(CFG, params, mesh=make_mesh(spec))
    model.prefill_chunk = 6
    np.testing.assert_allclose(model.logits(ids), logits, atol=1e-4, rtol=0)
    # one token per row: decode-sized expert chunks under shard_map
    np.testing.assert_allclose(model.logits(ids[:, :1]), logits[:, :1], atol=1e-4, rtol=0)
    got = [r.tokens for r in model.generate(prompts, max_new_tokens=8, stop_token_ids=[CFG.vocab_size - 1])]
    assert got == tokens
    cache = model.generator.new_cache(len(prompts), 40)  # the generate call's cache: 18 prompt + 16 new slots
    split = model.mesh.shape["expert"]
    assert seq_axis(model.mesh, cache.slots, model.rules) == ("expert" if split > 1 else None)
    assert cache.groups["layers_moe"].latent.sharding.shard_shape(cache.groups["layers_moe"].latent.shape)[2] == 40 // split


def test_greedy_on_a_mesh_equals_transformers_generate(reference):
    """3 prompts of different lengths in one batch, 32 new tokens, on all 8 devices (experts and heads split)."""
    params, _, _, prompts, _, ref_model = reference
    never = CFG.vocab_size - 1
    ref = hf_greedy_batch(ref_model, prompts, 32, never, CFG.pad_token_id)
    model = Mistral4(CFG, params, mesh=make_mesh("data=1,expert=4,tensor=2"))
    assert model.layer_loop == "scan"
    got = [r.tokens for r in model.generate(prompts, max_new_tokens=32, stop_token_ids=[never])]
    assert got == ref


def test_each_device_holds_its_share_of_the_experts(reference):
    params = reference[0]
    model = Mistral4(CFG, params, mesh=make_mesh("data=1,expert=4,tensor=2"))
    gate = model.params["layers_moe"]["moe"]["experts_gate"]  # [L, E, D, F]
    shards = gate.addressable_shards
    assert len(shards) == 8
    l, e, d, f = gate.shape
    for s in shards:
        assert s.data.shape == (l, e // 4, d, f // 2)
    assert len({(s.index[1].start, s.index[3].start) for s in shards}) == 8  # all different pieces
    q_b = model.params["layers_moe"]["attn"]["q_b_proj"]  # heads over tensor
    assert q_b.addressable_shards[0].data.shape[2] == CFG.num_attention_heads // 2


def test_bad_meshes_fail_clearly(reference):
    params = reference[0]
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        parse_mesh("expert=3,tensor=-1", 8)
    with pytest.raises(ValueError, match="uses 6 devices, but there are 8"):
        parse_mesh("expert=3,tensor=2", 8)
    with pytest.raises(ValueError, match="unknown axis 'pipeline'"):
        parse_mesh("pipeline=2", 8)
    assert parse_mesh("expert=4,tensor=-1", 8) == {"data": 1, "expert": 4, "tensor": 2}
    six = CFG.replace(n_routed_experts=6, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"'experts' dimension \(6\) is not divisible by mesh axis expert=4"):
        Mistral4(six, None, mesh=make_mesh("expert=4,tensor=2"))


def test_two_logical_axes_on_one_mesh_axis_are_refused(reference):
    with pytest.raises(ValueError, match=r"^colliding mesh axis 'tensor': logical axes 'q_lora' and 'heads' of "
                                         r"layers_dense/attn/q_b_proj$"):
        Mistral4(CFG, reference[0], mesh=make_mesh("data=1,expert=1,tensor=8"), rules=DEFAULT_RULES.replace(q_lora="tensor"))


def test_other_rules_change_the_layout_not_the_logits(reference):
    """Attention heads replicated instead of split over `tensor`: same logits."""
    params, ids, logits, *_ = reference
    model = Mistral4(CFG, params, mesh=make_mesh("data=1,expert=1,tensor=8"), rules=DEFAULT_RULES.replace(heads=None))
    assert model.params["layers_moe"]["attn"]["q_b_proj"].sharding.is_fully_replicated
    assert not model.params["layers_moe"]["moe"]["experts_gate"].sharding.is_fully_replicated  # expert_mlp still split
    np.testing.assert_allclose(model.logits(ids), logits, atol=1e-4, rtol=0)


def _compiled_forward(model: Mistral4, ids: np.ndarray) -> str:
    return model._forward.lower(model.params, ids, np.ones_like(ids), False).compile().as_text()


def test_moe_shard_map_follows_the_rules(reference):
    """Experts (and their hidden units) replicated on an expert mesh: the shard_map splits nothing, so the
    compiled forward has no all-reduce (the default rules split the experts and psum them), same logits."""
    params, ids, logits, *_ = reference
    m = make_mesh("data=1,expert=8,tensor=1")
    assert "all-reduce" in _compiled_forward(Mistral4(CFG, params, mesh=m), ids)
    model = Mistral4(CFG, params, mesh=m, rules=DEFAULT_RULES.replace(experts=None, expert_mlp=None))
    assert model.params["layers_moe"]["moe"]["experts_gate"].sharding.is_fully_replicated
    assert "all-reduce" not in _compiled_forward(model, ids)
    np.testing.assert_allclose(model.logits(ids), logits, atol=1e-4, rtol=0)
