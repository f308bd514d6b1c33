"""Long context: chunked prefill equals transformers' one-shot forward and generate (YaRN and Llama-4 query
scaling past the original context), on one device and with the cache's slots split over a mesh axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mistral4_jax
from mistral4_jax.model.attention import seq_axis
from mistral4_jax.sharding import make_mesh
from helpers import TINY, assert_logits_close, make_hf_model, save_hf

CFG = TINY.replace(original_max_position_embeddings=256)  # YaRN; the query scale changes every 256 positions
PROMPT = 4096


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("longctx")
    hf = make_hf_model(CFG, seed=5)
    save_hf(hf, str(d))
    return hf, d


def test_chunked_4k_prompt_equals_transformers(saved):
    """Logits of a 4,096-token prompt through chunks of 1,024 (dividing it) and 1,500 (not), the last
    positions only, and greedy continuations after chunks of 1,000: equal transformers' (float32)."""
    hf, d = saved
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, size=(1, PROMPT))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    model = mistral4_jax.load(d)
    model.verbose = False
    for chunk in (1024, 1500):
        model.prefill_chunk = chunk
        assert_logits_close(ref, model.logits(ids))
    np.testing.assert_allclose(model.logits(ids, last=5), model.logits(ids)[:, -5:], atol=1e-5)
    model.prefill_chunk = 1000
    never = CFG.vocab_size - 1
    with torch.no_grad():
        want = hf.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False, eos_token_id=never,
                           pad_token_id=CFG.pad_token_id)[0, PROMPT:].tolist()
    assert model.generate(ids[0].tolist(), max_new_tokens=8, stop_token_ids=[never])[0].tokens == want


def test_chunked_prefill_on_a_mesh_with_the_cache_split_over_slots(saved):
    """data x expert x tensor mesh, cache slots over `expert` (`cache_seq`): chunked prefill of a ragged
    batch (left padding, chunks that straddle the shards) and decode equal one device."""
    _, d = saved
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (300, 111)]
    single = mistral4_jax.load(d)
    single.verbose = False
    want = [g.tokens for g in single.generate(prompts, max_new_tokens=6, stop_token_ids=[])]
    model = mistral4_jax.load(d, mesh=make_mesh("data=2,expert=2,tensor=2"))
    model.verbose, model.prefill_chunk = False, 48
    cache = model.generator.new_cache(2, 640)
    assert seq_axis(model.mesh, cache.slots, model.rules) == "expert"
    assert cache.groups["layers_moe"].latent.sharding.shard_shape(cache.groups["layers_moe"].latent.shape)[2] == 320
    assert [g.tokens for g in model.generate(prompts, max_new_tokens=6, stop_token_ids=[])] == want
    ids = np.asarray([prompts[0][:200], prompts[0][100:300]])
    np.testing.assert_allclose(model.logits(ids), single.logits(ids), atol=2e-4)
