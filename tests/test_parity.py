"""End-to-end parity of the text model with transformers' Mistral4ForCausalLM (float32, tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mistral4_jax
from helpers import TINY, assert_logits_close, make_hf_model, router_choices, save_hf

VARIANTS = {
    "default": {},
    "no_q_lora": {"q_lora_rank": None},
    "grouped_router": {"n_group": 4, "topk_group": 2},
    "first_dense": {"first_k_dense_replace": 1, "num_hidden_layers": 3},
    "rope_not_interleaved": {"rope_interleave": False},
    "yarn_and_query_scale_active": {"original_max_position_embeddings": 4, "rope_factor": 8.0, "mscale": 0.7},
    "scaled_unnormalised_router": {"norm_topk_prob": False, "routed_scaling_factor": 2.5, "n_shared_experts": 2},
}


def _run(cfg, tmp_path, ids, mask=None, position_ids=None, seed=0, layer_loop="auto"):
    hf = make_hf_model(cfg, seed)
    save_hf(hf, str(tmp_path))
    records, remove = router_choices(hf)
    with torch.no_grad():
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(mask)
        if position_ids is not None:
            kwargs["position_ids"] = torch.tensor(position_ids)
        ref = hf(torch.tensor(ids), **kwargs).logits.numpy()
    remove()
    model = mistral4_jax.load(tmp_path, dtype="float32", layer_loop=layer_loop)
    assert model.layer_loop == ("scan" if layer_loop == "scan" else "unroll")  # auto: unrolled on CPU
    logits, experts = model.forward(ids, mask)
    return ref, np.asarray(logits), records, experts


def _assert_same_experts(records, experts, valid):
    b, t = valid.shape
    assert experts is not None and len(records) == experts.shape[0] > 0
    for layer, rec in enumerate(records):
        ref_sets = np.sort(rec.reshape(b, t, -1), axis=-1)[valid.astype(bool)]
        our_sets = np.sort(np.asarray(experts[layer]), axis=-1)[valid.astype(bool)]
        mismatch = np.nonzero((ref_sets != our_sets).any(-1))[0]
        assert mismatch.size == 0, f"layer {layer}: chosen experts differ at {mismatch.size} tokens, first {mismatch[:5]}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    cfg = TINY.replace(**VARIANTS[variant])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 24))
    ref, ours, records, experts = _run(cfg, tmp_path, ids)
    valid = np.ones(ids.shape, bool)
    assert_logits_close(ref, ours, valid)
    _assert_same_experts(records, experts, valid)


@pytest.mark.parametrize("variant", ["default", "first_dense"])
def test_scanned_layers_match_transformers(variant, tmp_path):
    """The same with the layers under `lax.scan` (stacked arrays: accelerators' default; CPU's is unrolled)."""
    cfg = TINY.replace(**VARIANTS[variant])
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 24))
    ref, ours, records, experts = _run(cfg, tmp_path, ids, layer_loop="scan")
    valid = np.ones(ids.shape, bool)
    assert_logits_close(ref, ours, valid)
    _assert_same_experts(records, experts, valid)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(side, tmp_path):
    """A batch of 2 prompts of different lengths with a padding mask; compared at real tokens only."""
    cfg = TINY.replace(original_max_position_embeddings=4)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 20))
    mask = np.ones_like(ids)
    if side == "right":
        mask[1, 13:] = 0
    else:
        mask[1, :7] = 0
    ids[mask == 0] = cfg.pad_token_id
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # what generation uses for left padding
    ref, ours, records, experts = _run(cfg, tmp_path, ids, mask, positions)
    assert_logits_close(ref, ours, mask)
    _assert_same_experts(records, experts, mask)
    # the padded row equals the same prompt run alone
    alone = mistral4_jax.load(tmp_path).logits(ids[1][mask[1] == 1][None])
    np.testing.assert_allclose(ours[1][mask[1] == 1], alone[0], atol=1e-4)


def test_bfloat16_storage_runs_close_to_float32(tmp_path):
    """bf16 storage with float32 compute equals the reference up to bf16 weight rounding."""
    cfg = TINY
    hf = make_hf_model(cfg, 3)
    save_hf(hf, str(tmp_path))
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 16))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        ref = hf(torch.tensor(ids)).logits.numpy()
    model = mistral4_jax.load(tmp_path, dtype="bfloat16")
    assert model.params["embed"].dtype.name == "bfloat16"
    assert_logits_close(ref, model.logits(ids))


def test_logits_api_checks_inputs(tmp_path):
    save_hf(make_hf_model(TINY), str(tmp_path))
    model = mistral4_jax.load(tmp_path)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model.logits([[0, TINY.vocab_size]])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.logits([[1, 2, 3]], attention_mask=[[1, 1]])
    with pytest.raises(ValueError, match="non-empty integer"):
        model.logits(np.zeros((1, 3), np.float32))
    out = model.logits([5, 6, 7])
    assert out.shape == (1, 3, TINY.vocab_size) and out.dtype == np.float32
