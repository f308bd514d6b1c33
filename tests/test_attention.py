"""Blockwise attention (`attn_block`: online softmax over key blocks): logits equal transformers' with blocks
that divide neither T nor S, on both MLA paths, and its compiled temporaries grow linearly in T."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral4_jax
from mistral4_jax import model as M
from mistral4_jax.model.splash import resolve_attn_backend
from mistral4_jax.sharding import make_mesh
from helpers import TINY, hf_and_model, hf_greedy_batch, make_hf_model, save_hf

CFG = TINY.replace(original_max_position_embeddings=4)  # YaRN + the Llama-4 query scale active
ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hf_and_model(CFG, 5, tmp_path_factory.mktemp("attn"))


def _close(ref: np.ndarray, ours: np.ndarray) -> None:
    diff = np.abs(ref - ours).max()
    assert diff <= ATOL, f"max |dlogit| {diff:.3g} > {ATOL}"
    assert np.abs(ref).max() > 0.1, "reference logits are ~0: the comparison would be vacuous"


@pytest.mark.parametrize("block", [3, 5])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_blockwise_prefill_matches_transformers(pair, block, padding):
    """Prefill (keys = the T = 23 new tokens, expanded per head) in blocks of 3 or 5, padded batches included."""
    hf, model = pair
    ids = np.random.default_rng(7).integers(3, CFG.vocab_size, size=(2, 23))
    mask = np.ones_like(ids)
    if padding == "right":
        mask[1, 14:] = 0
    elif padding == "left":
        mask[1, :8] = 0
    ids[mask == 0] = CFG.pad_token_id
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    ours, _, _ = model.apply(model.params, ids, pos, mask.astype(bool), attn_block=block)
    one_block, _, _ = model.apply(model.params, ids, pos, mask.astype(bool))
    real = mask.astype(bool)
    _close(ref[real], np.asarray(ours)[real])
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(one_block)[real], atol=1e-5)


@pytest.mark.parametrize("block", [3, 5])
def test_blockwise_chunks_after_a_cached_prefix_match_transformers(pair, block):
    """The absorbed path (`decode=True`, T = 8 > 1) over a 28-slot latent cache in blocks of 3 or 5: right-padded
    chunks continuing a cached prefix equal transformers on the whole sequence at every real token. The last
    chunk fills the slots that the last (slid-back) key block shares with the one before it."""
    hf, model = pair
    rng = np.random.default_rng(8)
    seq = rng.integers(3, CFG.vocab_size, size=27).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].numpy()
    width, slots, start = 8, 28, 0

    @jax.jit
    def chunk(params, ids, n, index, cache):  # n real tokens then padding, written at slot `index`
        pos = index + jnp.arange(width)[None]
        logits, _, cache = model.apply(params, ids, pos, (jnp.arange(width) < n)[None], cache=cache, index=index,
                                       decode=True, attn_block=block)
        return logits[0, :, :], cache

    cache = M.init_cache(CFG, 1, slots)
    for n in (5, 8, 3, 4, 7):
        ids = np.pad(seq[start:start + n], (0, width - n), constant_values=CFG.pad_token_id)[None]
        logits, cache = chunk(model.params, ids, np.int32(n), np.int32(start), cache)
        _close(ref[start:start + n], np.asarray(logits)[:n])
        start += n
    assert start == len(seq)


def test_blockwise_prefill_then_greedy_decode_equals_transformers(pair):
    """A left-padded batch prefilled into the cache in blocks of 3, then greedy decode steps over the cache:
    the tokens of transformers' generate."""
    hf, model = pair
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (11, 6)]
    steps, never = 12, CFG.vocab_size - 1
    ref = hf_greedy_batch(hf, prompts, steps, never, CFG.pad_token_id)
    t = max(map(len, prompts))
    ids = np.full((2, t), CFG.pad_token_id, np.int32)
    mask = np.zeros((2, t), bool)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, True
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)

    @jax.jit
    def prefill(params, cache):
        logits, _, cache = model.apply(params, ids, pos, mask, cache=cache, last_only=True, attn_block=3)
        return jnp.argmax(logits[:, -1], -1), cache

    @jax.jit
    def step(params, tok, p, index, cache):
        logits, _, cache = model.apply(params, tok[:, None], p[:, None], jnp.ones((2, 1), bool), cache=cache,
                                       index=index, decode=True, attn_block=3)
        return jnp.argmax(logits[:, -1], -1), cache

    tok, cache = prefill(model.params, M.init_cache(CFG, 2, t + steps))
    out, p = [tok], pos[:, -1] + 1
    for i in range(steps - 1):
        tok, cache = step(model.params, tok, p + i, np.int32(t + i), cache)
        out.append(tok)
    assert np.stack(out, 1).tolist() == ref


def _prefill_temp_bytes(model, t: int, block: int) -> int:
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    fn = jax.jit(lambda params, ids: model.apply(params, ids, jnp.arange(t)[None], jnp.ones((1, t), bool),
                                                 last_only=True, attn_block=block)[0])
    return fn.lower(model.params, ids).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temporaries_grow_linearly(pair):
    """XLA:CPU's compiled temporaries of a prefill: doubling T from 1,024 to 2,048 about doubles them with
    128-key blocks, where one block (the [B, N, T, T] scores) about quadruples them."""
    _, model = pair
    blocked = [_prefill_temp_bytes(model, t, 128) for t in (1024, 2048)]
    whole = [_prefill_temp_bytes(model, t, t) for t in (1024, 2048)]
    assert blocked[1] / blocked[0] < 2.6, blocked
    assert whole[1] / whole[0] > 3.0, whole  # the measurement tells the two apart
    assert blocked[1] < whole[1] / 4, (blocked, whole)


def test_attn_block_must_be_positive(pair):
    _, model = pair
    with pytest.raises(ValueError, match="attn_block must be a positive"):
        model.apply(model.params, np.zeros((1, 4), np.int32), np.arange(4)[None], np.ones((1, 4), bool), attn_block=0)


# ------------------------------------------------------------------------------- the fused TPU kernel
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("splash")
    hf = make_hf_model(CFG, 5)
    save_hf(hf, str(directory))
    return hf, directory


@pytest.mark.parametrize("mesh, padding", [(None, "right"), ("data=2,expert=2,tensor=2", "left")])
def test_splash_prefill_matches_transformers(saved, mesh, padding):
    """The TPU prefill kernel (Pallas splash attention, run by Pallas' interpreter on CPU) on T = 150 tokens
    (padded to 256 for its 128-token blocks), one device or batch and heads split over an 8-device mesh:
    the logits of transformers at every real token, and of the XLA blockwise path."""
    hf, directory = saved
    model = _load(directory, mesh)
    t = 150
    ids = np.random.default_rng(3).integers(3, CFG.vocab_size, size=(2, t))
    mask = np.ones_like(ids)
    if padding == "right":
        mask[1, 100:] = 0
    else:
        mask[1, :40] = 0
    ids[mask == 0] = CFG.pad_token_id
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    fused = jax.jit(lambda p: model.apply(p, ids, pos, mask.astype(bool), attn_backend="splash")[0])
    assert "pallas_call" in str(jax.make_jaxpr(fused)(model.params))
    ours = np.asarray(fused(model.params))
    xla, _, _ = model.apply(model.params, ids, pos, mask.astype(bool), attn_backend="xla")
    real = mask.astype(bool)
    _close(ref[real], ours[real])
    np.testing.assert_allclose(ours[real], np.asarray(xla)[real], atol=1e-4)


def _load(directory, mesh):
    return mistral4_jax.load(directory, mesh=None if mesh is None else make_mesh(mesh))


def test_attn_backend_choice():
    tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
    assert resolve_attn_backend("auto", 192, 128, tpu) == "splash"
    assert resolve_attn_backend("auto", 16, 16, tpu) == "xla"  # head dims the kernel does not tile
    assert resolve_attn_backend("auto", 192, 128) == "xla"  # this CPU
    with pytest.raises(ValueError, match="attn_backend must be one of auto, xla, splash, got 'flash'"):
        resolve_attn_backend("flash", 192, 128)
