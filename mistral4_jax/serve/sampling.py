"""Token samplers as pure, jit-friendly JAX functions.

Everything that varies per request is an *array* with one entry per batch row, so a single compiled
decode loop serves a batch of requests with different sampling settings without recompiling:

    params = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05)]
    t, k, p, m = SamplingParams.stack(params)           # numpy [B] arrays
    keys = row_keys(seeds, step)                          # [B] keys, one per row
    tokens = sample(logits, keys, t, k, p, m)             # [B] int32

Semantics (per row), in the usual order:

1. ``temperature == 0``: greedy, ``argmax(logits)`` (first index on ties); the other knobs are ignored.
2. temperature scaling: ``z = logits / temperature``.
3. top-k (``top_k == 0`` is off): keep the ``k`` largest ``z`` (ties broken by lower token id).
4. top-p (``top_p == 1`` is off): over the top-k-renormalised distribution sorted by probability,
   keep the smallest prefix whose cumulative probability reaches ``top_p``, i.e. rank ``r`` is kept iff
   the probability mass strictly before it is ``< top_p``; the most likely token is always kept.
5. min-p (``min_p == 0`` is off): keep tokens whose probability is ``>= min_p * max probability``.
   Renormalising after top-k/top-p scales all probabilities by the same factor and never removes the
   most likely token, so this is the same set whether computed before or after them.
6. a categorical draw from the renormalised kept set.

The kept set is the intersection of the three filters. The draw is Gumbel-max in *token-id space*:
``argmax(z + g)`` over kept tokens with ``g ~ Gumbel(row key, [V])``. Because the noise is indexed by
token id and drawn from the row's own key, a row's token depends only on its logits, its key and its
parameters - never on the other rows or on which code path the batch took (see below).

Cost (vocab 131072). top-k and top-p need the most likely tokens in order; greedy, pure-temperature
and min-p rows need only elementwise work, one max and the Gumbel noise (min-p is the threshold
``z >= max(z) + log(min_p)``). So the ordering work runs under a ``lax.cond`` and is skipped entirely
when no row of the batch uses top-k/top-p. When some row does, the choice is:

* default, ``candidates=C`` (static, 1024): ``lax.top_k(z, C)`` (a partial selection, far cheaper
  than sorting 131072 entries, especially on CPU/TPU). Top-p probabilities are normalised over the
  whole (top-k-masked) vocabulary, so the candidates decide a row exactly whenever its top-k set lies
  inside them (``0 < top_k <= C``) or its nucleus closes inside them (top-p mass of the C most likely
  tokens ``>= top_p``). Only if some row is not decided exactly (``top_k > C``, or a very flat
  distribution with top-p), a second ``lax.cond`` falls back to ONE full stable sort of the batch.
  Results are therefore always exact; the fallback only costs time, and only on such steps.
* ``candidates=None``: always the full sort (simplest, exact, slower).

So there is never more than one full sort per step, and usually none. Both paths compute the same
kept set; the only possible difference is float rounding of the cumulative sum exactly at a top-p
boundary (summation over arrays of different lengths), which can at most flip a token whose cumulative
mass equals ``top_p`` to the last ulp.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 1024
"""Static candidate count for `lax.top_k` before the (rare) exact full-sort fallback."""

__all__ = ["DEFAULT_CANDIDATES", "SamplingParams", "sample", "filter_mask", "filtered_logits", "row_keys"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (frozen, hashable).

    temperature: 0 = greedy (default); > 0 scales the logits.
    top_k: keep the k most likely tokens; 0 = off.
    top_p: nucleus mass in (0, 1]; 1 = off.
    min_p: keep tokens with prob >= min_p * max prob, in [0, 1); 0 = off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value!r}")
            return float(value)

        t = number("temperature", self.temperature)
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        k = number("top_k", self.top_k)
        if k != int(k):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if k > np.iinfo(np.int32).max:
            raise ValueError(f"top_k is too large: {self.top_k!r}")
        p = number("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        m = number("min_p", self.min_p)
        if not 0.0 <= m < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        # normalise types so equal settings hash equal (e.g. top_k=2.0 vs 2)
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "min_p", m)

    @property
    def greedy(self) -> bool:
        """True when this request decodes greedily (temperature 0)."""
        return self.temperature == 0.0

    @staticmethod
    def stack(params: Sequence["SamplingParams"]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-row arrays for `sample`: (temperature f32 [B], top_k i32 [B], top_p f32 [B], min_p f32 [B])."""
        if len(params) == 0:
            raise ValueError("need at least one SamplingParams")
        return (
            np.asarray([p.temperature for p in params], np.float32),
            np.asarray([p.top_k for p in params], np.int32),
            np.asarray([p.top_p for p in params], np.float32),
            np.asarray([p.min_p for p in params], np.float32),
        )


def row_keys(seeds: jax.Array | np.ndarray | Sequence[int], step: jax.Array | int) -> jax.Array:
    """One PRNG key per row: ``fold_in(key(seed_b), step)`` for each row b.

    seeds: [B] integers in [0, 2**32) (uint32 or int); step: scalar int, or [B] (each row's own step: rows of a
    continuously batched engine are at different steps); may be traced.
    Returns a typed key array [B]. A row's keys depend only on its own seed and the step, so the same
    seed gives the same tokens whatever else is in the batch.
    """
    seeds = jnp.asarray(np.asarray(seeds) if not isinstance(seeds, jax.Array) else seeds)
    if seeds.ndim != 1:
        raise ValueError(f"seeds must be a 1-D array [B], got shape {seeds.shape}")
    seeds = seeds.astype(jnp.uint32)
    step = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), seeds.shape)
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, step)


def _as_row_keys(key: jax.Array, batch: int) -> jax.Array:
    """[B] typed keys from either [B] keys (typed or raw uint32 [B, 2]) or a single key (split B ways)."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise ValueError(f"expected a single key or [B={batch}] keys, got key shape {key.shape}")
    return key


def _scale(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """z = logits / temperature for rows with temperature > 0 (greedy rows keep their logits): [B, V] f32."""
    t = temperature.astype(jnp.float32)[:, None]
    return logits / jnp.where(t > 0, t, 1.0)


def _mask_from_sorted(z: jax.Array, vals: jax.Array, idx: jax.Array, top_k: jax.Array, top_p: jax.Array,
                      lse_full: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The top-k ∩ top-p kept set from the N most likely tokens of each row.

    z [B, V] scaled logits; vals/idx [B, N] the N largest z in descending order (ties: lower id first)
    and their token ids (N = V after a full sort); lse_full [B, 1] = logsumexp(z).
    Returns (mask [B, V] bool in token-id space, exact [B] bool): `exact` says the N candidates were
    enough to decide the row exactly (always true for N = V).
    """
    batch, vocab = z.shape
    num = vals.shape[1]
    rank = jax.lax.broadcasted_iota(jnp.int32, (batch, num), 1)
    k = top_k.astype(jnp.int32)[:, None]
    k_inside = (k > 0) & (k <= num)           # the whole top-k set is among the candidates
    keep_k = jnp.where(k_inside, rank < k, True)
    masked = jnp.where(keep_k, vals, -jnp.inf)
    # normaliser of the top-k renormalised distribution (the full vocabulary when top-k is off/larger)
    lse = jnp.where(k_inside, jax.nn.logsumexp(masked, axis=1, keepdims=True), lse_full)
    probs = jnp.exp(masked - lse)
    cum = jnp.cumsum(probs, axis=1)
    before = cum - probs                       # mass strictly before each rank
    p = top_p.astype(jnp.float32)[:, None]
    keep_p = (p >= 1.0) | (before < p) | (rank == 0)
    rows = jnp.arange(batch)[:, None]
    mask = jnp.zeros((batch, vocab), jnp.bool_).at[rows, idx].set(keep_k & keep_p)
    if num == vocab:
        exact = jnp.ones((batch,), jnp.bool_)
    else:
        # top-k off: exact iff top-p is off too or the nucleus closes inside the N candidates;
        # top-k larger than N: never
        k0, p0 = k[:, 0], p[:, 0]
        exact = k_inside[:, 0] | ((k0 <= 0) & ((p0 >= 1.0) | (cum[:, -1] >= p0)))
    return mask, exact


def _full_sort_mask(z: jax.Array, top_k: jax.Array, top_p: jax.Array, lse_full: jax.Array) -> jax.Array:
    """top-k ∩ top-p mask [B, V] from one stable descending sort of every row (exact)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    neg_sorted, idx = jax.lax.sort((-z, iota), dimension=1, num_keys=1, is_stable=True)
    return _mask_from_sorted(z, -neg_sorted, idx, top_k, top_p, lse_full)[0]


def _top_k_p_mask(z: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int | None) -> jax.Array:
    """top-k ∩ top-p mask [B, V]: `lax.top_k(z, candidates)`, one full sort only when that is not enough."""
    vocab = z.shape[1]
    lse_full = jax.nn.logsumexp(z, axis=1, keepdims=True)
    if candidates is None or candidates >= vocab:
        return _full_sort_mask(z, top_k, top_p, lse_full)
    vals, idx = jax.lax.top_k(z, int(candidates))
    mask, exact = _mask_from_sorted(z, vals, idx, top_k, top_p, lse_full)
    return jax.lax.cond(jnp.all(exact), lambda: mask, lambda: _full_sort_mask(z, top_k, top_p, lse_full))


def filter_mask(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                min_p: jax.Array, *, candidates: int | None = DEFAULT_CANDIDATES) -> jax.Array:
    """Which tokens each row may sample: [B, V] bool (greedy rows: exactly their argmax).

    logits [B, V]; temperature, top_p, min_p [B] float; top_k [B] int. See the module docstring for the
    order and exact definition of the filters, and for `candidates`.
    """
    logits = jnp.asarray(logits, jnp.float32)
    batch, _ = logits.shape
    temperature = jnp.asarray(temperature, jnp.float32).reshape(batch)
    top_k = jnp.asarray(top_k, jnp.int32).reshape(batch)
    top_p = jnp.asarray(top_p, jnp.float32).reshape(batch)
    min_p = jnp.asarray(min_p, jnp.float32).reshape(batch)

    z = _scale(logits, temperature)
    greedy = temperature <= 0
    uses_sort = ((top_k > 0) | (top_p < 1.0)) & ~greedy
    # rows without top-k/top-p pass through unchanged (top_k 0 / top_p 1 never set `exact` false)
    off = ~uses_sort
    mask = jax.lax.cond(
        jnp.any(uses_sort),
        lambda: _top_k_p_mask(z, jnp.where(off, 0, top_k), jnp.where(off, 1.0, top_p), candidates) | off[:, None],
        lambda: jnp.ones(z.shape, jnp.bool_),
    )
    # min-p: p_i >= min_p * p_max  <=>  z_i >= max(z) + log(min_p)   (log(0) = -inf keeps all)
    zmax = jnp.max(z, axis=1, keepdims=True)
    mask &= (z >= zmax + jnp.log(min_p)[:, None]) & (z > -jnp.inf)  # zero-probability tokens never kept
    argmax = jax.nn.one_hot(jnp.argmax(logits, axis=1), logits.shape[1], dtype=jnp.bool_)
    return jnp.where(greedy[:, None], argmax, mask)


def filtered_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    min_p: jax.Array, *, candidates: int | None = DEFAULT_CANDIDATES) -> jax.Array:
    """Temperature-scaled logits with filtered-out tokens at -inf: [B, V] float32.

    ``softmax`` of a row is the distribution `sample` draws from (greedy rows: their argmax only).
    """
    logits = jnp.asarray(logits, jnp.float32)
    mask = filter_mask(logits, temperature, top_k, top_p, min_p, candidates=candidates)
    z = _scale(logits, jnp.asarray(temperature, jnp.float32).reshape(logits.shape[0]))
    return jnp.where(mask, z, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           min_p: jax.Array, *, candidates: int | None = DEFAULT_CANDIDATES) -> jax.Array:
    """Sample one token per row: [B] int32.

    logits: [B, V] (any float dtype; computed in float32).
    key: [B] keys, one per row (typed, or raw uint32 [B, 2]; see `row_keys`), or a single key that is
      split B ways (then rows are NOT independent of the batch size).
    temperature, top_p, min_p: [B] float32; top_k: [B] int32 - per-row settings (see `SamplingParams`;
      values are not validated here, validate with `SamplingParams` on the host).
    candidates: static; how many most likely tokens `lax.top_k` selects for top-k/top-p rows before
      falling back to one exact full sort when they do not decide some row (see the module docstring);
      None = always the full sort. The result is exact either way.

    Pure and jit-friendly: wrap in `jax.jit(sample, static_argnames="candidates")` or call inside a
    jitted decode loop. Greedy rows (temperature 0) return ``argmax(logits)`` and use no randomness.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    batch, vocab = logits.shape
    keys = _as_row_keys(key, batch)
    temperature = jnp.asarray(temperature, jnp.float32).reshape(batch)
    greedy = jnp.argmax(logits, axis=1).astype(jnp.int32)

    def draw() -> jax.Array:
        masked = filtered_logits(logits, temperature, top_k, top_p, min_p, candidates=candidates)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
        drawn = jnp.argmax(masked + gumbel, axis=1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # an all-greedy batch needs neither filters nor noise
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
