"""Generation: greedy tokens equal transformers' generate; the latent cache / absorbed decode equals the
expanded computation; stop tokens, budgets, seeds, streaming and bad input."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral4_jax
from mistral4_jax import model as M
from mistral4_jax.serve.generate import Request
from mistral4_jax.serve.memory import check_cache_fits
from mistral4_jax.serve.sampling import SamplingParams
from helpers import TINY, assert_logits_close, hf_greedy_batch, make_hf_model, save_hf

CFG = TINY.replace(original_max_position_embeddings=4)  # YaRN + query scaling active within the test lengths


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    hf = make_hf_model(CFG, seed=11)
    save_hf(hf, str(d))
    return hf, d


@pytest.fixture(scope="module")
def pair(saved):
    return saved[0], mistral4_jax.load(saved[1])


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (5, 13, 9)]


@pytest.mark.parametrize("layer_loop", ["auto", "scan"])
def test_greedy_equals_transformers_generate(saved, pair, prompts, layer_loop):
    """Both layer loops: "auto" is "unroll" here (CPU, no mesh: per-layer arrays), "scan" the stacked layout."""
    hf, model = pair
    if layer_loop == "scan":
        model = mistral4_jax.load(saved[1], layer_loop="scan")
    assert model.layer_loop == ("scan" if layer_loop == "scan" else "unroll")
    never = CFG.vocab_size - 1
    ref = hf_greedy_batch(hf, prompts, 32, never, CFG.pad_token_id)
    ours = model.generate(prompts, max_new_tokens=32, stop_token_ids=[never])
    for r, o in zip(ref, ours):
        assert o.tokens == r[: len(o.tokens)] and len(o.tokens) == 32, (r, o.tokens)
        assert o.finish_reason == "length"


def test_absorbed_decode_equals_expanded_forward(pair, prompts):
    """Prefill half a sequence into the cache, decode the rest token by token (absorbed MLA):
    every logit equals the one-shot expanded forward."""
    _, model = pair
    seq = np.asarray(prompts[1] + prompts[2])[None]
    full = model.logits(seq)[0]
    t0, s = 7, seq.shape[1]
    pos = np.arange(s)[None]
    prefill = jax.jit(lambda p, ids, pos, cache: model.apply(p, ids, pos, jnp.ones(ids.shape, bool), cache=cache))
    decode = jax.jit(lambda p, ids, pos, cache, index: model.apply(p, ids, pos, jnp.ones(ids.shape, bool), cache=cache,
                                                                     index=index, decode=True))
    cache = M.init_cache(CFG, 1, s + 3)
    logits, _, cache = prefill(model.params, seq[:, :t0], pos[:, :t0], cache)
    np.testing.assert_allclose(np.asarray(logits[0]), full[:t0], atol=1e-4)
    for i in range(t0, s):  # one compiled step, the index traced
        logits, _, cache = decode(model.params, seq[:, i:i + 1], pos[:, i:i + 1], cache, jnp.int32(i))
        np.testing.assert_allclose(np.asarray(logits[0, 0]), full[i], atol=1e-4)
    # a decode step over several tokens at once is the same computation
    cache2 = M.init_cache(CFG, 1, s)
    _, _, cache2 = prefill(model.params, seq[:, :t0], pos[:, :t0], cache2)
    logits, _, _ = decode(model.params, seq[:, t0:], pos[:, t0:], cache2, jnp.int32(t0))
    np.testing.assert_allclose(np.asarray(logits[0]), full[t0:], atol=1e-4)
    assert cache.groups["layers_moe"].latent.shape == (CFG.num_moe_layers, 1, s + 3, CFG.kv_lora_rank)


def test_chunks_after_a_cached_prefix_equal_transformers(pair, prompts):
    """A chat turn's prefill: right-padded chunks written at an offset into the cache attend to the cached
    prefix and to themselves (`decode=True`, T > 1). Split unevenly, so each chunk's padding slots are
    overwritten by the next chunk, every real token's logits equal transformers' on the whole sequence, and
    `logits_at` picks a chunk's last real token."""
    hf, model = pair
    seq = prompts[1] + prompts[2] + prompts[0]
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].numpy()
    c = 8

    @jax.jit
    def chunk(params, ids, n, index, cache):
        pos = index + jnp.arange(c)[None]
        real = (jnp.arange(c) < n)[None]
        full, _, cache = model.apply(params, ids, pos, real, cache=cache, index=index, decode=True)
        last, _, _ = model.apply(params, ids, pos, real, cache=cache, index=index, decode=True, logits_at=n[None] - 1)
        return full[0], last[0, 0], cache

    cache, start = M.init_cache(CFG, 1, 40), 0
    for n in (5, 8, 3, 7, 4):
        ids = np.full((1, c), CFG.pad_token_id, np.int32)
        ids[0, :n] = seq[start:start + n]
        full, last, cache = chunk(model.params, ids, np.int32(n), np.int32(start), cache)
        assert_logits_close(ref[start:start + n], np.asarray(full[:n]))
        np.testing.assert_allclose(np.asarray(last), np.asarray(full[n - 1]), atol=1e-5)
        start += n
    assert start == len(seq)


def test_empty_stop_token_ids_means_no_stop_token(pair, prompts, monkeypatch):
    """stop_token_ids=[]: no stop token at all (not the default eos); rows end only at their budgets."""
    _, model = pair
    free = model.generate(prompts, max_new_tokens=20, stop_token_ids=[CFG.vocab_size - 1])
    stop = free[0].tokens[6]
    monkeypatch.setattr(model, "config", CFG.replace(eos_token_id=stop))  # the default stop now occurs
    assert model.generate(prompts, max_new_tokens=20)[0].finish_reason == "stop"
    res = model.generate(prompts, max_new_tokens=20, stop_token_ids=[])
    assert [r.tokens for r in res] == [f.tokens for f in free]
    assert all(r.finish_reason == "length" and len(r.tokens) == 20 for r in res)


def test_stop_tokens_and_per_row_budgets(pair, prompts):
    _, model = pair
    free = model.generate(prompts, max_new_tokens=20, stop_token_ids=[CFG.vocab_size - 1])
    stop = free[0].tokens[6]
    first = free[0].tokens.index(stop)
    res = model.generate(prompts, max_new_tokens=20, stop_token_ids=[stop, CFG.vocab_size - 1])
    assert res[0].tokens == free[0].tokens[:first] and res[0].finish_reason == "stop"
    for r, f in zip(res[1:], free[1:]):
        cut = f.tokens.index(stop) if stop in f.tokens else 20
        assert r.tokens == f.tokens[:cut]
    short = model.generate(prompts[:2], max_new_tokens=3, stop_token_ids=[CFG.vocab_size - 1])
    assert [len(r.tokens) for r in short] == [3, 3] and short[0].tokens == free[0].tokens[:3]


def test_seeds_reproduce_and_streaming_matches(pair, prompts):
    _, model = pair
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, stop_token_ids=[CFG.vocab_size - 1])
    a = model.generate(prompts, seed=[1, 2, 3], **kw)
    b = model.generate(prompts, seed=[1, 2, 3], **kw)
    c = model.generate(prompts, seed=[4, 5, 6], **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    alone = model.generate([prompts[1]], seed=[2], **kw)  # a row does not depend on its batch
    assert alone[0].tokens == a[1].tokens
    reqs = [Request(p, 24, SamplingParams(1.0, 50, 0.9), s) for p, s in zip(prompts, [1, 2, 3])]
    stream = model.generator.stream(reqs, [CFG.vocab_size - 1], chunk=5)
    assert stream.result is None
    chunks = list(stream)
    assert len(chunks) > 3
    assert [sum((ch[i] for ch in chunks), []) for i in range(3)] == [r.tokens for r in a]
    assert stream.result == a  # the same Generations (tokens, finish_reason, prompt_tokens) as generate


def test_generation_bad_input(pair):
    _, model = pair
    with pytest.raises(ValueError, match="non-empty list"):
        model.generate([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1, 2], []])
    with pytest.raises(ValueError, match="outside"):
        model.generate([[1, CFG.vocab_size]])
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1, 2]], temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1, 2]], top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate([[1, 2]], top_k=-3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate([[1, 2]], max_new_tokens=CFG.max_position_embeddings)


def test_compiled_decode_step_updates_the_donated_cache_in_place():
    """The cache rides in the layer scan's carry and each layer writes its token's slot: the compiled decode
    step aliases the donated cache to its output, and its temporaries do not hold another copy of the cache
    (a cache passed through the scan as xs / ys did: temporaries grew by ~2.5 caches per cache)."""
    params = M.abstract_params(CFG, jnp.float32)

    def step(params, cache, ids, index):
        return M.forward(params, CFG, ids, ids, jnp.ones(ids.shape, bool), cache=cache, index=index, decode=True)[::2]

    def compiled(slots):
        cache = jax.eval_shape(lambda: M.init_cache(CFG, 1, slots))
        exe = jax.jit(step, donate_argnums=1).lower(params, cache, jax.ShapeDtypeStruct((1, 1), jnp.int32),
                                                    jax.ShapeDtypeStruct((), jnp.int32)).compile()
        return exe, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

    (small, small_bytes), (big, big_bytes) = compiled(1024), compiled(4096)
    for exe, nbytes in ((small, small_bytes), (big, big_bytes)):
        assert exe.memory_analysis().alias_size_in_bytes == nbytes
        assert exe.as_text().count("may-alias") == 1 + 2 * len(M.layer_groups(CFG))  # valid, latent and k_rope per group
    grown = big.memory_analysis().temp_size_in_bytes - small.memory_analysis().temp_size_in_bytes
    assert grown < 2 * (big_bytes - small_bytes)


def test_a_cache_that_does_not_fit_is_refused_before_allocation(monkeypatch):
    """MISTRAL4_JAX_DEVICE_MEMORY sets the bytes free per device. TINY's float32 cache holds 2 layers x (16 + 8)
    numbers x 4 bytes = 192 bytes per slot and row: 4 KiB free refuses the cache of a 5-token prompt with 4 new
    tokens (naming its bytes) before any allocation; exactly its bytes free lets it run."""
    model = mistral4_jax.Mistral4(TINY, M.init_params(TINY, jax.random.key(0)))
    model.verbose = False
    monkeypatch.setenv("MISTRAL4_JAX_DEVICE_MEMORY", "4KiB")
    with monkeypatch.context() as m:
        m.setattr(M, "init_cache", lambda *a, **k: pytest.fail("the cache was allocated"))
        with pytest.raises(ValueError, match="cache for 1 row needs") as refused:
            model.generate([[5, 6, 7, 8, 9]], max_new_tokens=4, stop_token_ids=[])
    slots = int(re.match(r"a ([\d,]+)-slot cache", str(refused.value)).group(1).replace(",", ""))
    assert f"needs {slots * 192 / 1024:.1f} KiB per device (after the weights); 4.0 KiB free on " \
           "MISTRAL4_JAX_DEVICE_MEMORY" in str(refused.value)
    monkeypatch.setenv("MISTRAL4_JAX_DEVICE_MEMORY", str(slots * 192))
    g, = model.generate([[5, 6, 7, 8, 9]], max_new_tokens=4, stop_token_ids=[])
    assert len(g.tokens) == 4
    monkeypatch.delenv("MISTRAL4_JAX_DEVICE_MEMORY")  # on CPU: the host's MemAvailable, shared by the devices
    with pytest.raises(ValueError, match=r"a 1,000,000,000,000-slot cache for 2 rows needs 349.2 TiB per device .*"
                                         r"free on this host \(MemAvailable"):
        check_cache_fits(model, 2, 10**12, jnp.float32)
