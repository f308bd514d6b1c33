"""Samplers: filter sets against a numpy reference, draws stay inside them, greedy, seeds, row independence."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral4_jax.serve.sampling import (
    DEFAULT_CANDIDATES,
    SamplingParams,
    filter_mask,
    filtered_logits,
    row_keys,
    sample,
)

V = 64  # small vocabulary for the statistical tests

sample_jit = jax.jit(sample, static_argnames="candidates")
mask_jit = jax.jit(filter_mask, static_argnames="candidates")
flog_jit = jax.jit(filtered_logits, static_argnames="candidates")


# ----------------------------------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------------------------------

def np_mask(logits: np.ndarray, t: float, k: int, p: float, m: float) -> np.ndarray:
    """Kept set of one row, float64, written from the definitions (stable sort: ties by lower id)."""
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[0]
    if t == 0:
        out = np.zeros(vocab, bool)
        out[int(np.argmax(logits))] = True
        return out
    z = logits / t
    order = np.argsort(-z, kind="stable")
    rank = np.empty(vocab, int)
    rank[order] = np.arange(vocab)
    keep_k = rank < k if k > 0 else np.ones(vocab, bool)
    pk = np.where(keep_k, np.exp(z - z.max()), 0.0)
    pk /= pk.sum()
    ps = pk[order]
    before = np.cumsum(ps) - ps
    if p < 1.0:
        # the test inputs must not sit on a top-p boundary (float32 vs float64 would be ambiguous)
        assert np.min(np.abs(before[: max(k, 1) if k > 0 else vocab] - p)) > 1e-5, "ill-conditioned top_p"
        keep_p_sorted = (before < p) | (np.arange(vocab) == 0)
    else:
        keep_p_sorted = np.ones(vocab, bool)
    keep_p = keep_p_sorted[rank]
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    keep_m = probs >= m * probs.max()
    return keep_k & keep_p & keep_m


def np_dist(logits: np.ndarray, t: float, k: int, p: float, m: float) -> np.ndarray:
    """The distribution a row samples from: softmax of z over the kept set."""
    mask = np_mask(logits, t, k, p, m)
    if t == 0:
        return mask.astype(np.float64)
    z = np.asarray(logits, np.float64) / t
    w = np.where(mask, np.exp(z - z.max()), 0.0)
    return w / w.sum()


CONFIGS = [
    SamplingParams(),                                         # greedy
    SamplingParams(temperature=1.0),                          # pure temperature
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.5, top_p=0.3),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=2.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02),
    SamplingParams(temperature=1.0, top_k=200, top_p=0.95),  # top_k larger than the vocabulary
    SamplingParams(temperature=1.0, top_k=10, top_p=0.5),
    SamplingParams(temperature=3.0, top_p=0.99),              # wide nucleus
]


def _logits(n_rows: int, vocab: int = V, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n_rows, vocab)) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# SamplingParams
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.01), "min_p"),
])
def test_invalid_params_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_params_frozen_hashable_and_stack():
    a = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05)
    assert a == SamplingParams(temperature=0.7, top_k=40.0, top_p=0.9, min_p=0.05)
    assert hash(a) == hash(SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05))
    assert len({a, SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05), SamplingParams()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.top_k = 3  # type: ignore[misc]
    assert SamplingParams().greedy and not a.greedy
    t, k, p, m = SamplingParams.stack([SamplingParams(), a])
    assert (t.dtype, k.dtype, p.dtype, m.dtype) == (np.float32, np.int32, np.float32, np.float32)
    np.testing.assert_allclose(t, [0.0, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(k, [0, 40])
    with pytest.raises(ValueError):
        SamplingParams.stack([])


# ----------------------------------------------------------------------------------------------------
# filter sets and distributions against numpy (one batch, per-row parameters)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("candidates", [DEFAULT_CANDIDATES, None, 8])
def test_filter_sets_match_numpy(candidates):
    """Every config is a row of ONE batch; candidates=8 forces the exact full-sort fallback for some rows."""
    n_logit_rows = 4
    logits = _logits(n_logit_rows * len(CONFIGS), seed=1)
    params = [c for c in CONFIGS for _ in range(n_logit_rows)]
    t, k, p, m = SamplingParams.stack(params)
    fl = np.asarray(flog_jit(logits, t, k, p, m, candidates=candidates), np.float64)
    got = np.isfinite(fl)  # the kept set (filtered_logits puts everything else at -inf)
    for i, c in enumerate(params):
        want = np_mask(logits[i], c.temperature, c.top_k, c.top_p, c.min_p)
        np.testing.assert_array_equal(got[i], want, err_msg=f"row {i}: {c}")
        if c.top_k > 0 and not c.greedy:
            assert got[i].sum() <= c.top_k
    # the filtered distribution itself
    for i, c in enumerate(params):
        if c.greedy:
            continue
        probs = np.exp(fl[i] - fl[i].max())
        probs /= probs.sum()
        np.testing.assert_allclose(probs, np_dist(logits[i], c.temperature, c.top_k, c.top_p, c.min_p),
                                   atol=1e-6, err_msg=f"row {i}: {c}")


def test_top_k_ties_keep_exactly_k_lowest_ids():
    logits = np.zeros((1, V), np.float32)
    logits[0, [3, 9, 17, 40, 41]] = 5.0  # five tied maxima
    t, k, p, m = SamplingParams.stack([SamplingParams(temperature=1.0, top_k=3)])
    for cands in (DEFAULT_CANDIDATES, None):
        got = np.asarray(mask_jit(logits, t, k, p, m, candidates=cands))[0]
        assert np.flatnonzero(got).tolist() == [3, 9, 17]


def test_top_p_nucleus_exact_set():
    """Hand-made distribution: probs 0.5, 0.25, 0.125, ... -> nucleus sizes are known exactly."""
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], np.float64)
    perm = np.array([4, 0, 5, 2, 1, 3])  # scatter the ranks over ids
    logits = np.full((1, 8), -np.inf, np.float32)
    logits[0, perm] = np.log(probs)
    cases = {0.4: 1, 0.5: 1, 0.6: 2, 0.8: 3, 0.9: 4, 0.95: 5, 1.0: 6}
    params = [SamplingParams(temperature=1.0, top_p=tp) for tp in cases]
    t, k, p, m = SamplingParams.stack(params)
    got = np.asarray(mask_jit(np.repeat(logits, len(params), 0), t, k, p, m))
    for row, (tp, n) in enumerate(cases.items()):
        assert sorted(np.flatnonzero(got[row]).tolist()) == sorted(perm[:n].tolist()), tp


def test_min_p_exact_set():
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = np.log(probs)[None].astype(np.float32)
    # min_p * 0.4: 0.5 -> 0.2 (keeps 0.4, 0.3, 0.2); 0.8 -> 0.32 (0.4 only); 0.1 -> 0.04 (all)
    cases = {0.5: [0, 1, 2], 0.8: [0], 0.12: [0, 1, 2, 3], 0.05: [0, 1, 2, 3, 4]}
    params = [SamplingParams(temperature=1.0, min_p=mp) for mp in cases]
    t, k, p, m = SamplingParams.stack(params)
    got = np.asarray(mask_jit(np.repeat(logits, len(params), 0), t, k, p, m))
    for row, want in enumerate(cases.values()):
        assert np.flatnonzero(got[row]).tolist() == want


# ----------------------------------------------------------------------------------------------------
# draws
# ----------------------------------------------------------------------------------------------------

def test_draws_stay_inside_kept_set_and_follow_distribution():
    """2000 draws per config, all configs in one vectorised call (one compile)."""
    n_draws = 2000
    base = _logits(1, seed=2)[0]
    params = [c for c in CONFIGS for _ in range(n_draws)]
    logits = np.broadcast_to(base, (len(params), V))
    t, k, p, m = SamplingParams.stack(params)
    keys = row_keys(np.arange(len(params)), 0)
    tokens = np.asarray(sample_jit(logits, keys, t, k, p, m))
    for ci, c in enumerate(CONFIGS):
        toks = tokens[ci * n_draws:(ci + 1) * n_draws]
        dist = np_dist(base, c.temperature, c.top_k, c.top_p, c.min_p)
        inside = dist > 0
        assert inside[toks].all(), f"{c}: drew outside the kept set"
        if c.top_k > 0:
            best = np.argsort(-base, kind="stable")[: c.top_k]
            assert np.isin(toks, best).all(), f"{c}: drew outside the top-{c.top_k}"
        freq = np.bincount(toks, minlength=V) / n_draws
        sigma = np.sqrt(dist * (1 - dist) / n_draws)
        assert np.all(np.abs(freq - dist) <= 5 * sigma + 2e-3), f"{c}: frequencies off"


def test_top_k_never_outside_k_best_real_vocab():
    """Real vocabulary size (131072), 1000 draws per row with a flat-ish distribution."""
    vocab, n = 131072, 16
    base = _logits(1, vocab=vocab, seed=3, scale=0.5)[0]
    k_val = 7
    params = [SamplingParams(temperature=5.0, top_k=k_val)] * n
    t, k, p, m = SamplingParams.stack(params)
    best = set(np.argsort(-base, kind="stable")[:k_val].tolist())
    drawn = set()
    logits = np.broadcast_to(base, (n, vocab))
    for step in range(8):
        toks = np.asarray(sample_jit(logits, row_keys(np.arange(n), step), t, k, p, m))
        drawn |= set(toks.tolist())
    assert drawn <= best and len(drawn) >= 5


def test_temperature_zero_is_argmax():
    logits = _logits(6, vocab=1000, seed=4)
    params = [SamplingParams(), SamplingParams(top_k=3), SamplingParams(top_p=0.1),
              SamplingParams(min_p=0.5), SamplingParams(top_k=1, top_p=0.5, min_p=0.9), SamplingParams()]
    t, k, p, m = SamplingParams.stack(params)
    for step in range(3):
        toks = np.asarray(sample_jit(logits, row_keys(np.arange(6) + 100 * step, step), t, k, p, m))
        np.testing.assert_array_equal(toks, logits.argmax(-1))
    # mixed batch: greedy rows stay argmax while other rows sample
    t2 = t.copy()
    t2[1::2] = 1.0
    toks = np.asarray(sample_jit(logits, row_keys(np.arange(6), 0), t2, k, p, m))
    np.testing.assert_array_equal(toks[0::2], logits.argmax(-1)[0::2])
    assert toks.dtype == np.int32


def test_greedy_on_real_vocab_matches_argmax_bf16():
    logits = jnp.asarray(_logits(3, vocab=131072, seed=5), jnp.bfloat16)
    t, k, p, m = SamplingParams.stack([SamplingParams()] * 3)
    toks = np.asarray(sample_jit(logits, row_keys(np.arange(3), 0), t, k, p, m))
    np.testing.assert_array_equal(toks, np.asarray(jnp.argmax(logits.astype(jnp.float32), -1)))


# ----------------------------------------------------------------------------------------------------
# seeds and row independence
# ----------------------------------------------------------------------------------------------------

def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = np.broadcast_to(_logits(1, seed=6)[0], (64, V))
    t, k, p, m = SamplingParams.stack([SamplingParams(temperature=1.0)] * 64)
    seeds = np.full(64, 1234)
    a = np.asarray(sample_jit(logits, row_keys(seeds, 3), t, k, p, m))
    b = np.asarray(sample_jit(logits, row_keys(seeds, 3), t, k, p, m))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 1  # same seed + same step -> same key in every row
    c = np.asarray(sample_jit(logits, row_keys(np.arange(64), 3), t, k, p, m))
    assert len(set(c.tolist())) > 5
    d = np.asarray(sample_jit(logits, row_keys(seeds, 4), t, k, p, m))
    e = [int(sample_jit(logits[:1], row_keys([1234], s), t[:1], k[:1], p[:1], m[:1])[0]) for s in range(20)]
    assert len(set(e)) > 3 and d[0] == e[4]


def test_row_result_independent_of_other_rows():
    """A row's token depends only on its logits, seed and parameters - not on batch size, position or the
    other rows' settings (which also change the code path: greedy-only, top-k, full-sort fallback)."""
    rng = np.random.default_rng(7)
    logits = _logits(1, vocab=512, seed=8)
    targets = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9),
               SamplingParams(temperature=1.2, top_k=50, min_p=0.01)]
    others = [SamplingParams(), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=1.0, top_k=600),          # top_k > candidates -> full sort
              SamplingParams(temperature=50.0, top_p=0.999)]       # nucleus > candidates -> full sort
    for target in targets:
        for step in range(4):
            t, k, p, m = SamplingParams.stack([target])
            alone = int(sample_jit(logits, row_keys([42], step), t, k, p, m, candidates=16)[0])
            for other in others:
                pos = int(rng.integers(0, 4))
                batch = [other] * 4
                batch.insert(pos, target)
                seeds = rng.integers(0, 2**32, size=5, dtype=np.uint64)
                seeds[pos] = 42
                lg = _logits(5, vocab=512, seed=step + 100)
                lg[pos] = logits[0]
                t, k, p, m = SamplingParams.stack(batch)
                toks = np.asarray(sample_jit(lg, row_keys(seeds, step), t, k, p, m, candidates=16))
                assert toks[pos] == alone, (target, other, step)


def test_row_keys_and_single_key():
    a = jax.random.key_data(row_keys(np.array([1, 2, 3], np.uint32), 5))
    b = jax.random.key_data(row_keys([1, 2, 3], jnp.int32(5)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, jax.random.key_data(row_keys([1, 2, 3], 6)))
    np.testing.assert_array_equal(
        jax.random.key_data(row_keys([2**32 - 1], 0))[0],
        jax.random.key_data(jax.random.fold_in(jax.random.key(np.uint32(2**32 - 1)), 0)))
    # a single key (typed or raw) is split over the batch
    logits = _logits(3, seed=9)
    t, k, p, m = SamplingParams.stack([SamplingParams(temperature=1.0)] * 3)
    x = sample_jit(logits, jax.random.key(0), t, k, p, m)
    y = sample_jit(logits, jax.random.PRNGKey(0), t, k, p, m)
    np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError):
        sample(logits, row_keys([1, 2], 0), t, k, p, m)


def test_one_compile_serves_different_settings_in_a_decode_loop():
    """Per-row settings are traced arrays: new values never retrace; works under lax.scan."""
    traces = []

    @jax.jit
    def loop(logits, seeds, t, k, p, m):
        traces.append(1)

        def step(carry, i):
            toks = sample(logits + carry[:, None].astype(jnp.float32) * 0.0, row_keys(seeds, i), t, k, p, m)
            return toks, toks

        _, out = jax.lax.scan(step, jnp.zeros(logits.shape[0], jnp.int32), jnp.arange(6))
        return out  # [steps, B]

    logits = _logits(3, seed=10)
    for batch in ([SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=4)],
                  [SamplingParams(temperature=2.0, top_p=0.5), SamplingParams(min_p=0.3, temperature=1.0),
                   SamplingParams()]):
        t, k, p, m = SamplingParams.stack(batch)
        out = np.asarray(loop(logits, np.array([1, 2, 3], np.uint32), t, k, p, m))
        assert out.shape == (6, 3)
        for row, c in enumerate(batch):
            allowed = np_mask(logits[row], c.temperature, c.top_k, c.top_p, c.min_p)
            assert allowed[out[:, row]].all()
    assert len(traces) == 1
