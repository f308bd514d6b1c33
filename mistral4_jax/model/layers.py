"""Mistral 4 text decoder as functional Flax (linen) modules.

Every parameter is declared once, next to its use, with its shape and logical axis names; the
layers are stacked ([layers, ...] leading axis) and applied with `lax.scan`, so compile time does not
grow with depth. `forward` is a pure function of the parameter tree (built from the modules' `apply`). Storage dtype (`param_dtype`) and compute dtype (`dtype`) are separate: on CPU compute
in float32 whatever the weights are stored in.

Einsum letters: B batch, T query tokens, S key positions, D hidden, N heads, Q q_lora rank,
L kv_lora rank (the latent), P nope dims, R rope dims, H = P + R, V value dims, E experts, K top-k,
F expert hidden, I dense hidden, X vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import ACTIVATIONS
from .config import Mistral4Config, yarn_get_mscale

Array = jax.Array
_NEG_INF = -1e30


# --------------------------------------------------------------------------------------------- rope
def rope_inv_freq(cfg: Mistral4Config, seq_len: Array | None = None) -> tuple[Any, float]:
    """Inverse frequencies [R/2] (float32; [B, R/2] for "dynamic"/"longrope" given seq_len [B]) and the
    cos/sin attention factor, as transformers' `ROPE_INIT_FUNCTIONS` compute them over R = qk_rope_head_dim:

    - "default" `theta^(-2i/R)`; "linear" those / factor; "proportional" (qk_nope_head_dim 0) the first
      `partial_rotary_factor` of them / factor, the rest 0 (not rotated).
    - "llama3": wavelengths above `original_max / low_freq_factor` divided by factor, below
      `original_max / high_freq_factor` kept, a smooth blend between.
    - "yarn": a linear ramp between the correction dims (from beta_fast/beta_slow) blends extrapolated
      (`1/base_i`) and interpolated (`1/(factor*base_i)`) frequencies.
    - "dynamic" (NTK) and "longrope" depend on the row's current length `seq_len` (its largest position + 1 in
      this call, as transformers' `dynamic_rope_update` takes it from the call's position ids): past
      L0 = max_position_embeddings, dynamic uses `theta * (factor * L / L0 - factor + 1) ^ (R / (R - 2))`;
      longrope divides by `long_factor` instead of `short_factor` past original_max_position_embeddings.
      seq_len None gives their short-sequence frequencies.
    """
    dim, base, factor, kind = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_type
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponent
    plain = (1.0 / pos_freqs).astype(np.float32)
    if kind == "default":
        return plain, 1.0
    if kind == "linear":
        return plain / np.float32(factor), 1.0
    if kind == "proportional":
        pairs = int((1.0 if cfg.partial_rotary_factor is None else cfg.partial_rotary_factor) * dim // 2)
        return np.where(np.arange(dim // 2) < pairs, plain, np.float32(0)) / np.float32(factor), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(cfg, plain), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, pos_freqs)
    if kind == "dynamic":
        if seq_len is None:
            return plain, 1.0
        long = cfg.max_position_embeddings
        length = jnp.maximum(seq_len, long).astype(jnp.float32)
        theta = base * (factor * length / long - (factor - 1)) ** (dim / (dim - 2))  # [B]
        grown = 1.0 / theta[:, None] ** jnp.asarray(exponent)
        return jnp.where((seq_len > long)[:, None], grown, jnp.asarray(plain)), 1.0
    # longrope
    orig = cfg.original_max_position_embeddings
    attn_factor = cfg.rope_attention_factor
    if attn_factor is None:
        attn_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    short, long_ = (1.0 / (np.asarray(f, np.float32) * pos_freqs) for f in (cfg.rope_short_factor, cfg.rope_long_factor))
    if seq_len is None:
        return short, attn_factor
    return jnp.where((seq_len > orig)[:, None], jnp.asarray(long_), jnp.asarray(short)), attn_factor


def _llama3_inv_freq(cfg: Mistral4Config, inv_freq: np.ndarray) -> np.ndarray:
    """transformers' `_compute_llama3_parameters` on the plain frequencies [R/2] (float32)."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    with np.errstate(divide="ignore", invalid="ignore"):  # high == low: no medium band, the blend is unused
        smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_inv_freq(cfg: Mistral4Config, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    """transformers' `_compute_yarn_parameters` from `theta^(2i/R)` [R/2]: (inv_freq, attention factor)."""
    dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(cfg.original_max_position_embeddings / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = 1 - ramp
    inv_freq = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    if cfg.rope_attention_factor is not None:
        attn_factor = cfg.rope_attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        attn_factor = yarn_get_mscale(factor, cfg.mscale) / yarn_get_mscale(factor, cfg.mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(factor)
    return inv_freq.astype(np.float32), float(attn_factor)


def rope_cos_sin(cfg: Mistral4Config, positions: Array, seq_len: Array | None = None) -> tuple[Array, Array]:
    """cos, sin [B, T, R/2] (float32) for integer positions [B, T]; seq_len [B] as in `rope_inv_freq`."""
    inv_freq, attn_factor = rope_inv_freq(cfg, seq_len)
    inv_freq = jnp.asarray(inv_freq)
    if inv_freq.ndim == 2:  # per row
        inv_freq = inv_freq[:, None]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: Array, cos: Array, sin: Array, interleave: bool) -> Array:
    """Rotate the last axis (R rope dims) of x; cos/sin [..., R/2] broadcast against x[..., :R/2].

    interleave=True rotates the pairs (x[2i], x[2i+1]) and writes the result de-interleaved
    (all rotated evens, then all rotated odds), as HF's `apply_rotary_pos_emb_interleave`;
    interleave=False rotates (x[i], x[i + R/2]) ("rotate half").
    """
    half = x.shape[-1] // 2
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama4_query_scale(cfg: Mistral4Config, positions: Array) -> Array:
    """Per-position query multiplier [B, T]: 1 + beta * ln(1 + floor(pos / original_max_position_embeddings))."""
    if not cfg.llama_4_scaling_beta:
        return jnp.ones(positions.shape, jnp.float32)
    p = positions.astype(jnp.float32)
    return 1 + cfg.llama_4_scaling_beta * jnp.log1p(jnp.floor(p / cfg.original_max_position_embeddings))


# ------------------------------------------------------------------------------------------- router
def route(logits: Array, cfg: Mistral4Config) -> tuple[Array, Array]:
    """Group-limited top-k softmax router, as HF's `Mistral4TopkRouter`.

    logits [T, E] -> (weights [T, K] in logits' dtype, expert ids [T, K] int32).
    """
    scores = jax.nn.softmax(logits, axis=-1)
    choice = scores
    if cfg.n_group > 1:
        t, e = scores.shape
        grouped = scores.reshape(t, cfg.n_group, e // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [T, topk_group]
        keep = jnp.any(top_groups[..., None] == jnp.arange(cfg.n_group), axis=-2)  # [T, G]
        keep = jnp.repeat(keep, e // cfg.n_group, axis=-1)  # [T, E]
        choice = jnp.where(keep, scores, 0.0)
    _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32)


# ------------------------------------------------------------------------------------------ experts
MOE_BACKENDS = ("auto", "loop", "ragged")


def resolve_moe_backend(backend: str, mesh: Any = None) -> str:
    """"loop" or "ragged" for `backend` in `MOE_BACKENDS`; "auto" = "loop" on CPU, "ragged" on TPU/GPU
    (the platform of the mesh's devices, else JAX's default backend)."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"moe_backend must be one of {', '.join(MOE_BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "loop" if platform == "cpu" else "ragged"


def _dequant(w: Array, scale: Array | None, dtype: Any) -> Array:
    """w cast to dtype, times its FP8 scale (broadcast) if any."""
    w = w.astype(dtype)
    return w if scale is None else w * scale.astype(dtype)


def _expert_weight(w: Array, scales: tuple[Array | None, ...] | None, j: int, i: Array, dtype: Any) -> Array:
    """Expert i's slice of w (i may be traced), cast to dtype and times its FP8 scale if any."""
    pick = functools.partial(jax.lax.dynamic_index_in_dim, index=i, keepdims=False)
    return _dequant(pick(w), None if scales is None or scales[j] is None else pick(scales[j]), dtype)


def _local_copies(ids: Array, e: int, first_expert: Array | int) -> tuple[Array, Array, Array]:
    """The T*K token copies and the E experts held here: (valid [T, K] (expert held here), local expert
    per copy [T*K] (e = not here), counts [E] (copies per expert))."""
    local = ids - first_expert
    valid = (local >= 0) & (local < e)
    flat = jnp.where(valid, local, e).reshape(-1)
    counts = jnp.zeros((e + 1,), jnp.int32).at[flat].add(1)[:e]
    return valid, flat, counts


def _sort_by_expert(flat: Array, e: int) -> tuple[Array, Array]:
    """(order [N]: sorted slot -> copy, back [N]: copy -> sorted slot) for the N copies' experts `flat`
    (values 0..e), copies of one expert in copy order: a stable argsort, computed as one unstable sort
    of the distinct keys expert * N + copy (on TPU it compiles ~3x faster than a stable sort)."""
    n = flat.shape[0]
    assert (e + 1) * n < 2**31, "sort keys must fit in int32"
    copy = jnp.arange(n, dtype=jnp.int32)
    order = jax.lax.sort(flat.astype(jnp.int32) * n + copy, is_stable=False) % n
    return order, jnp.zeros_like(order).at[order].set(copy)


EXPERT_CHUNK_ROWS = 64
"""Rows per matmul in the "loop" backend: an expert with more copies runs in chunks of this many."""


def routed_experts(
    x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array, first_expert: Array | int = 0,
    scales: tuple[Array | None, Array | None, Array | None] | None = None, act: Any = jax.nn.silu,
    backend: str = "loop", rows: int | None = None,
) -> Array:
    """Weighted sum of the chosen experts' gated MLPs `down(act(gate x) * up x)`, exact (no token is dropped,
    no capacity).

    x [T, D]; ids, weights [T, K]; gate, up [E, D, F]; down [E, F, D] -> [T, D] (x's dtype).
    The expert weights may be in their storage dtype (with FP8, `scales` holds the three [E, 1, 1]
    dequantisation scales, None for a weight stored in float); they are dequantised to x's dtype where they are read.
    The experts held here are `first_expert .. first_expert + E - 1` (all of them unless sharded);
    assignments to other experts contribute zero.

    `backend` ("loop" or "ragged", see `resolve_moe_backend`) picks the kernel; both give the same
    result. "loop" (`_experts_loop`, the CPU's) traces a loop over the chosen experts. "ragged" has
    static shapes only, chosen by shape: with at most as many token copies as experts held
    (T*K <= E: decode) `_experts_gathered` reads only the chosen experts; otherwise
    `_experts_ragged` runs one grouped matmul (`jax.lax.ragged_dot`) per projection over the copies
    sorted by expert, `rows` of them at a time (None = all T*K at once).
    """
    if backend == "loop":
        return _experts_loop(x, ids, weights, gate, up, down, first_expert, scales, act)
    if backend != "ragged":
        raise ValueError(f"routed_experts: backend must be 'loop' or 'ragged', got {backend!r}")
    if ids.size <= gate.shape[0]:
        return _experts_gathered(x, ids, weights, gate, up, down, first_expert, scales, act)
    return _experts_ragged(x, ids, weights, gate, up, down, first_expert, scales, act, rows)


def _experts_loop(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array,
                  first_expert: Array | int, scales: tuple[Array | None, ...] | None, act: Any) -> Array:
    """`routed_experts` for CPU: the T*K token copies are sorted by expert. A loop over the experts that
    some copy chose (the others' weights are never read) runs each one on its own rows,
    R = min(`EXPERT_CHUNK_ROWS`, T) at a time (an inner loop); the last chunk is padded only up to the
    next power of two (a `lax.switch` over a few static matmul shapes; its extra rows belong to the next
    expert, which overwrites them). Outputs land in sorted order; the copies are then weighted and summed
    per token. On CPU this beats batched einsums over a fixed capacity, which compute every expert at the
    busiest one's size, and `ragged_dot`, which XLA:CPU runs as a dense matmul masked per expert.
    """
    t, k = ids.shape
    e, dim = gate.shape[0], x.shape[1]
    valid, flat, counts = _local_copies(ids, e, first_expert)
    order, back = _sort_by_expert(flat, e)
    starts = jnp.cumsum(counts) - counts
    chosen = jnp.nonzero(counts > 0, size=e, fill_value=0)[0]
    rows = min(EXPERT_CHUNK_ROWS, t)
    tiers = tuple(1 << j for j in range(rows.bit_length()) if 1 << j < rows) + (rows,)
    xs = jnp.concatenate([x[order // k], jnp.zeros((rows, dim), x.dtype)])  # [T*K + R, D] sorted copies

    def expert(n: Array, out: Array) -> Array:
        i = chosen[n]
        g, u, d = (_expert_weight(w, scales, j, i, x.dtype) for j, w in enumerate((gate, up, down)))

        def tier(r: int) -> Any:
            def run(start: Array) -> Array:  # [r, D] rows from `start`, zero-padded to [R, D]
                xr = jax.lax.dynamic_slice_in_dim(xs, start, r)
                return jnp.pad((act(xr @ g) * (xr @ u)) @ d, ((0, rows - r), (0, 0)))
            return run

        def chunk(carry: tuple[Array, Array]) -> tuple[Array, Array]:
            c, out = carry
            start = starts[i] + c * rows
            left = jnp.minimum(counts[i] - c * rows, rows)
            y = jax.lax.switch(jnp.searchsorted(jnp.asarray(tiers), left), [tier(r) for r in tiers], start)
            return c + 1, jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=0)

        return jax.lax.while_loop(lambda carry: carry[0] * rows < counts[i], chunk, (0, out))[1]

    out = jax.lax.fori_loop(0, jnp.sum(counts > 0), expert, jnp.zeros_like(xs))
    w = jnp.where(valid, weights, 0).astype(x.dtype)
    return jnp.einsum("tkd,tk->td", out[back].reshape(t, k, dim), w)


def _experts_gathered(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array,
                      first_expert: Array | int, scales: tuple[Array | None, ...] | None, act: Any) -> Array:
    """`routed_experts` for few tokens (T*K <= E, decode): reads only the chosen experts' weights.

    The U = T*K slots hold the distinct chosen experts held here (unused slots: -1). Each slot is one
    `lax.cond`: if used, its expert's three matrices are sliced out of the stacked arrays, dequantised
    and applied to all T tokens, weighted by each token's routing weight for that expert (0 for tokens
    that did not choose it); else nothing is read. Static shapes, no loop: the compiler counts every slot
    as taken (U experts, the most a chip may have to read). A grouped matmul would read (and, FP8 on TPU,
    convert) every expert held: `ragged_dot` on TPU v5e, 4 rows against 16 FP8 experts of 4096 x 1024,
    reports 320 MiB accessed against 4 MiB for one sliced expert.
    """
    t, k = ids.shape
    e = gate.shape[0]
    valid, flat, counts = _local_copies(ids, e, first_expert)
    chosen = jnp.nonzero(counts > 0, size=t * k, fill_value=-1)[0]  # [U] distinct experts held here
    combine = jnp.zeros((t, e + 1), x.dtype).at[jnp.arange(t)[:, None], flat.reshape(t, k)].add(
        jnp.where(valid, weights, 0).astype(x.dtype))[:, :e]  # [T, E] routing weight per (token, expert)

    def slot(i: Array) -> Array:
        g, u, d = (_expert_weight(w, scales, j, i, x.dtype) for j, w in enumerate((gate, up, down)))
        w = jax.lax.dynamic_index_in_dim(combine, i, axis=1)  # [T, 1]
        return ((act(x @ g) * (x @ u)) @ d) * w

    out = jnp.zeros_like(x)
    for n in range(t * k):
        out = out + jax.lax.cond(chosen[n] >= 0, slot, lambda i: jnp.zeros_like(x), chosen[n])
    return out


def _experts_ragged(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array,
                    first_expert: Array | int, scales: tuple[Array | None, ...] | None, act: Any,
                    rows: int | None) -> Array:
    """`routed_experts` as grouped matmuls: the token copies held here, sorted by expert, go through
    `jax.lax.ragged_dot` once per projection (gate, up, down), `rows` copies at a time (static shapes;
    None = all T*K copies in one call); copies not held here sort last and are never in a group.
    The stacked weights are dequantised once (FP8 on TPU: converted to the compute dtype anyway, as
    `ragged_dot` does not fuse the conversion). With `rows` < T*K (expert shards: each holds about
    T*K / shards copies) a `while_loop` runs ceil(held copies / rows) calls, usually one; XLA's cost
    analysis counts one call, i.e. `rows` copies. Outputs land in sorted order; each token then
    gathers and weights its K copies from each chunk (a gather: on TPU a row scatter-add compiles ~3x
    slower).
    """
    t, k = ids.shape
    e = gate.shape[0]
    n = t * k
    valid, flat, counts = _local_copies(ids, e, first_expert)
    order, back = _sort_by_expert(flat, e)
    rows = n if rows is None else min(rows, n)
    chunks = -(-n // rows)
    tok = jnp.pad(order // k, (0, chunks * rows - n))  # [N'] token of each sorted copy
    ends = jnp.cumsum(counts)
    g, u, d = (_dequant(w, None if scales is None else scales[j], x.dtype) for j, w in enumerate((gate, up, down)))

    w = jnp.where(valid, weights, 0).astype(x.dtype)
    wsorted = jnp.pad(w.reshape(-1)[order], (0, chunks * rows - n))

    def chunk(c: Array, out: Array) -> Array:  # sorted copies [c * R, (c + 1) * R), added to out [T, D]
        start = c * rows
        sizes = (jnp.clip(ends - start, 0, rows) - jnp.clip(ends - counts - start, 0, rows)).astype(jnp.int32)  # [E]
        xr = x[jax.lax.dynamic_slice_in_dim(tok, start, rows)]  # [R, D]
        h = act(jax.lax.ragged_dot(xr, g, sizes)) * jax.lax.ragged_dot(xr, u, sizes)
        y = jax.lax.ragged_dot(h, d, sizes)  # rows past the groups: not computed, may hold anything
        wr = jax.lax.dynamic_slice_in_dim(wsorted, start, rows)
        y = jnp.where((jnp.arange(rows) < sizes.sum())[:, None], y * wr[:, None], 0)
        return out.at[jax.lax.dynamic_slice_in_dim(tok, start, rows)].add(y.astype(jnp.float32))

    out = jnp.zeros_like(x, jnp.float32)  # (zeros_like: varies over a shard_map's axes as x does)
    if chunks == 1:
        return chunk(0, out).astype(x.dtype)
    return jax.lax.fori_loop(0, (jnp.sum(counts) + rows - 1) // rows, chunk, out).astype(x.dtype)


# ------------------------------------------------------------------------------------------ modules
def _normal(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


FP8_WEIGHTS = frozenset({
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "experts_gate", "experts_up", "experts_down",
})
"""Weights stored as float8_e4m3fn when `param_dtype` is FP8 (norms, router, embedding, lm_head stay float),
except those a checkpoint lists in its `float_weights` (see `init_params`)."""


def fp8_scale_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the float32 scale stored beside FP8 weight `name`: per expert [E, 1, 1] or per tensor [1, ...]."""
    return (shape[0],) + (1,) * (len(shape) - 1) if name.startswith("experts_") else (1,) * len(shape)


def is_fp8(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.float8_e4m3fn


class _Base(nn.Module):
    """Shared helpers: `dtype` is the compute dtype, `param_dtype` the storage dtype, `mesh` (or None)
    the device mesh that the MoE shards its experts over.

    With an FP8 `param_dtype`, the weights in `FP8_WEIGHTS` are stored as float8_e4m3fn with a float32
    `<name>_scale` beside them (dequantised on use: `float(w) * scale`); all others are stored in bfloat16.
    `apply` follows the parameters it is given: a weight of `FP8_WEIGHTS` stored in a float dtype (a
    `float_weights` entry) is used as it is, without a scale.
    """

    cfg: Mistral4Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mesh: Any = None

    def storage_dtype(self, name: str) -> Any:
        return jnp.bfloat16 if is_fp8(self.param_dtype) and name not in FP8_WEIGHTS else self.param_dtype

    def stored(self, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init=None) -> tuple[Array, Array | None]:
        """Declare parameter `name` and return it as stored, with its FP8 scale (or None)."""
        init = _normal() if init is None else init
        w = jnp.asarray(self.param(name, nn.with_logical_partitioning(init, axes), shape, self.storage_dtype(name)))
        if not is_fp8(w.dtype):
            return w, None
        scale_shape = fp8_scale_shape(name, shape)
        scale_axes = tuple(a if n > 1 else None for a, n in zip(axes, scale_shape))
        scale = self.param(name + "_scale", nn.with_logical_partitioning(nn.initializers.ones, scale_axes), scale_shape, jnp.float32)
        return w, jnp.asarray(scale)

    def weight(self, name: str, axes: tuple[str, ...], shape: tuple[int, ...], init=None) -> Array:
        """Parameter `name` in the compute dtype (FP8 dequantised: float(w) * scale)."""
        w, scale = self.stored(name, axes, shape, init)
        w = w.astype(self.dtype)
        return w if scale is None else w * scale.astype(self.dtype)


class RMSNorm(_Base):
    """x * rsqrt(mean(x^2) + eps) in float32, cast to the compute dtype, times `scale`."""

    eps: float = 1e-6
    axis: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.weight("scale", (self.axis,), (x.shape[-1],), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(self.dtype)


class MLP(_Base):
    """Gated MLP: down(act(gate x) * up x) with act = `cfg.hidden_act`; x [..., D] -> [..., D]."""

    width: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = self.cfg.hidden_size
        gate = self.weight("gate_proj", ("embed", "mlp"), (d, self.width))
        up = self.weight("up_proj", ("embed", "mlp"), (d, self.width))
        down = self.weight("down_proj", ("mlp", "embed"), (self.width, d))
        return (ACTIVATIONS[self.cfg.hidden_act](x @ gate) * (x @ up)) @ down


def _attend(scores: Array, scale: Array, mask: Array, dtype: Any) -> Array:
    """Masked softmax in float32: scores [B, N, T, S], scale [B, 1, T, 1], mask [B, T, S] -> probs (dtype)."""
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32) * scale, _NEG_INF)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


class MLA(_Base):
    """Multi-head latent attention: low-rank q and kv, one rope key shared by all heads.

    x [B, T, D], cos/sin [B, T, R/2], qscale [B, T] -> ([B, T, D], cache).
    Without `decode`: attention among the T new tokens, expanded per head (mask [B, T, T]).
    With `decode`: attention over the whole latent cache (mask [B, T, S]) with `kv_b_proj` absorbed into
    the query (scores) and the output (values), never expanding the cache per head. T may be > 1: a chunk
    of new tokens then attends to the cached prefix and to itself (causally, through the mask).
    `cache` = (latent [B, S, L], k_rope [B, S, R]) or None; the new tokens are written at slot `index`.
    """

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, qscale: Array, mask: Array,
                 cache: tuple[Array, Array] | None = None, index: Array | int = 0, decode: bool = False):
        c = self.cfg
        d, n, p, r, v, lat = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        norm = functools.partial(RMSNorm, c, self.dtype, self.param_dtype, None, 1e-6)
        if c.q_lora_rank:
            q = x @ self.weight("q_a_proj", ("embed", "q_lora"), (d, c.q_lora_rank))
            q = norm(axis="q_lora", name="q_a_norm")(q)
            q = jnp.einsum("btq,qnh->btnh", q, self.weight("q_b_proj", ("q_lora", "heads", "qk_dim"), (c.q_lora_rank, n, p + r)))
        else:
            q = jnp.einsum("btd,dnh->btnh", x, self.weight("q_proj", ("embed", "heads", "qk_dim"), (d, n, p + r)))
        q_nope = q[..., :p]
        q_rope = apply_rope(q[..., p:], cos[:, :, None], sin[:, :, None], c.rope_interleave)  # [B, T, N, R]
        kv = x @ self.weight("kv_a_proj", ("embed", "kv_lora_rope"), (d, lat + r))
        latent = norm(axis="kv_lora", name="kv_a_norm")(kv[..., :lat])  # [B, T, L]
        k_rope = apply_rope(kv[..., lat:], cos, sin, c.rope_interleave)  # [B, T, R]
        k_b = self.weight("k_b_proj", ("kv_lora", "heads", "qk_nope_dim"), (lat, n, p))
        v_b = self.weight("v_b_proj", ("kv_lora", "heads", "v_dim"), (lat, n, v))
        scale = qscale[:, None, :, None] * c.softmax_scale
        if cache is not None:
            cache = (jax.lax.dynamic_update_slice_in_dim(cache[0], latent.astype(cache[0].dtype), index, axis=1),
                     jax.lax.dynamic_update_slice_in_dim(cache[1], k_rope.astype(cache[1].dtype), index, axis=1))
        if decode:
            assert cache is not None, "decode attends over a cache"
            lat_s, rope_s = cache[0].astype(self.dtype), cache[1].astype(self.dtype)  # [B, S, L], [B, S, R]
            q_lat = jnp.einsum("btnp,lnp->btnl", q_nope, k_b)
            scores = jnp.einsum("btnl,bsl->bnts", q_lat, lat_s) + jnp.einsum("btnr,bsr->bnts", q_rope, rope_s)
            ctx = jnp.einsum("bnts,bsl->btnl", _attend(scores, scale, mask, self.dtype), lat_s)
            out = jnp.einsum("btnl,lnv->btnv", ctx, v_b)
        else:
            k_nope = jnp.einsum("bsl,lnp->bsnp", latent, k_b)
            values = jnp.einsum("bsl,lnv->bsnv", latent, v_b)
            scores = jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope) + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope)
            out = jnp.einsum("bnts,bsnv->btnv", _attend(scores, scale, mask, self.dtype), values)
        return jnp.einsum("btnv,nvd->btd", out, self.weight("o_proj", ("heads", "v_dim", "embed"), (n, v, d))), cache


class MoE(_Base):
    """Routed experts (fused [E, ...] arrays) plus the shared expert; x [B, T, D] -> ([B, T, D], ids [B, T, K]).
    `backend`: the routed experts' kernel, "loop" or "ragged" (`routed_experts`)."""

    backend: str = "loop"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        c = self.cfg
        d, e, f = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        b, t, _ = x.shape
        router = self.weight("router", ("embed", "router_experts"), (d, e))
        weights, ids = route((x @ router).reshape(b * t, e), c)
        gate, gs = self.stored("experts_gate", ("experts", "embed", "expert_mlp"), (e, d, f))
        up, us = self.stored("experts_up", ("experts", "embed", "expert_mlp"), (e, d, f))
        down, ds = self.stored("experts_down", ("experts", "expert_mlp", "embed"), (e, f, d))
        scales = None if gs is us is ds is None else (gs, us, ds)
        act = ACTIVATIONS[c.hidden_act]
        if self.mesh is not None:
            from .sharding import sharded_routed_experts

            y = sharded_routed_experts(self.mesh, x.reshape(b * t, d), ids, weights, gate, up, down, scales, act,
                                       backend=self.backend)
        else:
            y = routed_experts(x.reshape(b * t, d), ids, weights, gate, up, down, scales=scales, act=act,
                               backend=self.backend)
        y = y.reshape(b, t, d)
        y = y + MLP(c, self.dtype, self.param_dtype, self.mesh, width=c.shared_intermediate_size, name="shared_expert")(x)
        return y, ids.reshape(b, t, -1)


class DecoderLayer(_Base):
    """h + attn(norm(h)), then + ffn(norm(h)). Returns (h, (routed expert ids or None, cache))."""

    moe: bool = True
    moe_backend: str = "loop"

    @nn.compact
    def __call__(self, h: Array, cos: Array, sin: Array, qscale: Array, mask: Array,
                 cache: tuple[Array, Array] | None = None, index: Array | int = 0, decode: bool = False):
        c = self.cfg
        sub = (c, self.dtype, self.param_dtype, self.mesh)
        norm = functools.partial(RMSNorm, *sub, c.rms_norm_eps)
        a, cache = MLA(*sub, name="attn")(norm(name="input_norm")(h), cos, sin, qscale, mask, cache, index, decode)
        h = h + a
        x = norm(name="post_attn_norm")(h)
        if self.moe:
            y, ids = MoE(*sub, backend=self.moe_backend, name="moe")(x)
        else:
            y, ids = MLP(*sub, width=c.intermediate_size, name="mlp")(x), None
        return h + y, (ids, cache)


# --------------------------------------------------------------------------------- parameter tree
def layer_groups(cfg: Mistral4Config) -> list[tuple[str, int, bool]]:
    """(name, number of layers, is_moe) of each stacked layer group, in order."""
    groups = [("layers_dense", cfg.first_k_dense_replace, False), ("layers_moe", cfg.num_moe_layers, True)]
    return [g for g in groups if g[1] > 0]


def _layer(cfg: Mistral4Config, moe: bool, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, mesh: Any = None,
           moe_backend: str = "loop") -> DecoderLayer:
    return DecoderLayer(cfg, dtype, param_dtype, mesh, moe=moe, moe_backend=moe_backend)


def _init_layer_boxed(cfg: Mistral4Config, moe: bool, param_dtype: Any, key: Array) -> Any:
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    cs = jnp.zeros((1, 1, cfg.qk_rope_head_dim // 2), jnp.float32)
    return _layer(cfg, moe, param_dtype=param_dtype).init(key, x, cs, cs, jnp.ones((1, 1)), jnp.ones((1, 1, 1), bool))["params"]


def _top_level_specs(cfg: Mistral4Config, param_dtype: Any) -> dict[str, tuple[tuple[int, ...], Any, tuple[str, ...]]]:
    float_dtype = jnp.bfloat16 if is_fp8(param_dtype) else param_dtype
    specs = {
        "embed": ((cfg.vocab_size, cfg.hidden_size), float_dtype, ("vocab", "embed")),
        "final_norm": ((cfg.hidden_size,), float_dtype, ("norm",)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((cfg.vocab_size, cfg.hidden_size), float_dtype, ("vocab", "embed"))  # as embed: [X, D]
    return specs


def param_axes(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Logical axis names of every parameter (a tree of tuples matching `abstract_params`)."""
    out: dict[str, Any] = {}
    for name, (_, _, axes) in _top_level_specs(cfg, param_dtype).items():
        out[name] = {"scale": axes} if name == "final_norm" else axes
    for name, _, moe in layer_groups(cfg):
        boxed = jax.eval_shape(functools.partial(_init_layer_boxed, cfg, moe, param_dtype), jax.random.key(0))
        specs = nn.get_partition_spec(boxed)
        out[name] = jax.tree_util.tree_map(lambda s: ("layers", *s), specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    if is_fp8(param_dtype):
        out = _with_float_weights(out, float_weights, lambda axes, _: axes)
    return out


def init_params(cfg: Mistral4Config, key: Array, param_dtype: Any = jnp.float32,
                float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Random parameters (normal(0.02) weights, unit norms); layers stacked [layers, ...].

    float_weights: with an FP8 `param_dtype`, the weights of `FP8_WEIGHTS` stored in bfloat16 instead, without
    a scale, as paths in the tree ("layers_moe/attn/kv_a_proj"): a converted checkpoint lists those whose
    source was not FP8 (the released checkpoint keeps `kv_a_proj_with_mqa` in bf16). Ignored for float dtypes.
    """
    keys = jax.random.split(key, 8)
    out: dict[str, Any] = {}
    for i, (name, (shape, dtype, _)) in enumerate(_top_level_specs(cfg, param_dtype).items()):
        if name == "final_norm":
            out[name] = {"scale": jnp.ones(shape, dtype)}
        else:
            out[name] = (0.02 * jax.random.normal(keys[i], shape, jnp.float32)).astype(dtype)
    for j, (name, n, moe) in enumerate(layer_groups(cfg)):
        layer_keys = jax.random.split(keys[4 + j], n)
        out[name] = nn.unbox(jax.vmap(functools.partial(_init_layer_boxed, cfg, moe, param_dtype))(layer_keys))
    if is_fp8(param_dtype):
        out = _with_float_weights(out, float_weights, lambda w, s: (w.astype(jnp.float32) * s).astype(jnp.bfloat16))
    return out


def abstract_params(cfg: Mistral4Config, param_dtype: Any = jnp.float32, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_params, cfg, param_dtype=param_dtype, float_weights=tuple(float_weights)),
                          jax.random.key(0))


def _with_float_weights(tree: dict[str, Any], float_weights: Sequence[str], fn: Any) -> dict[str, Any]:
    """`tree` (parameters, or a tree matching them) with each FP8 weight at a `float_weights` path replaced by
    fn(weight, scale) and its `_scale` dropped (dicts copied, leaves shared). ValueError for a path that is
    not an FP8 weight of the tree."""
    copy = lambda t: {k: copy(v) for k, v in t.items()} if isinstance(t, dict) else t  # noqa: E731
    tree = copy(tree)
    for path in float_weights:
        *parents, name = path.split("/")
        node: Any = tree
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if name not in FP8_WEIGHTS or not isinstance(node, dict) or name + "_scale" not in node:
            raise ValueError(f"float_weights: {path!r} is not an FP8 weight of this model")
        node[name] = fn(node[name], node.pop(name + "_scale"))
    return tree


def stored_float_weights(params: dict[str, Any]) -> tuple[str, ...]:
    """The `float_weights` of a stacked parameter tree (arrays or `ShapeDtypeStruct`s): the paths of the
    `FP8_WEIGHTS` stored without a `_scale` beside them, if the tree holds FP8 weights at all, else ()."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if not any(is_fp8(x.dtype) for x in flat.values()):
        return ()
    return tuple(sorted(p for p in flat if p.rsplit("/", 1)[-1] in FP8_WEIGHTS and p + "_scale" not in flat))


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Layer groups as lists of per-layer trees (for `layer_loop="unroll"`); other entries unchanged."""
    out = dict(params)
    for name in ("layers_dense", "layers_moe"):
        if name in params and not isinstance(params[name], list):
            n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
            out[name] = [jax.tree_util.tree_map(lambda x, i=i: x[i], params[name]) for i in range(n)]
    return out


# -------------------------------------------------------------------------------------------- cache
def init_cache(cfg: Mistral4Config, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """An empty latent KV cache: per layer group latent [Lg, B, S, L] and k_rope [Lg, B, S, R], plus
    `valid` [B, S] (which slots hold real tokens). kv_lora + qk_rope numbers per token per layer."""
    cache: dict[str, Any] = {"valid": jnp.zeros((batch, max_len), bool)}
    for name, n, _ in layer_groups(cfg):
        cache[name] = (jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                       jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))
    return cache


CACHE_AXES = {"valid": ("cache_batch", "cache_seq"),
              "latent": ("layers", "cache_batch", "cache_seq", "kv_lora"),
              "k_rope": ("layers", "cache_batch", "cache_seq", "rope_dim")}
"""Logical axes of the cache arrays (the per-group (latent, k_rope) pair and `valid`)."""


# ------------------------------------------------------------------------------------------ forward
def forward(
    params: dict[str, Any],
    cfg: Mistral4Config,
    input_ids: Array,
    positions: Array,
    key_valid: Array,
    *,
    cache: dict[str, Any] | None = None,
    index: Array | int = 0,
    decode: bool = False,
    last_only: bool = False,
    logits_at: Array | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: Any = None,
    image_features: Array | None = None,
    image_token_index: int = 10,
    moe_backend: str = "auto",
) -> tuple[Array, Array | None, dict[str, Any] | None]:
    """The decoder: embed, layer groups, final norm, lm_head.

    input_ids, positions [B, T] int; key_valid [B, T] bool (False = padding).
    Without `decode` the T tokens attend among themselves (prefill); if `cache` is given they are also
    written into it at slot `index`. With `decode` they are written at `index` and attend over the
    whole cache (absorbed MLA), causally: token t sees the valid slots up to `index + t`. That serves a
    decode step (T = 1) and equally a chunk of prompt continuing a cached prefix (T > 1: the prefix,
    then the chunk itself; a chat turn prefilled after the conversation so far). Layer groups stored stacked run under `lax.scan`; stored as lists
    (see `unstack_layers`) they run as an unrolled loop.
    `image_features` [M, D] (prefill only): rows replace, in order, the embeddings of the tokens equal to
    `image_token_index` (`[IMG]`), batch row by batch row, as HF's `masked_scatter`; rows past the number
    of `[IMG]` tokens are ignored (so M may be padded to a bucket). None: the text-only path.
    `last_only`: logits of the last token only; `logits_at` [B] int: of token `logits_at[b]` of each row
    only (the last real token of a right-padded chunk). Both give logits [B, 1, X].
    `moe_backend`: the routed experts' kernel (`resolve_moe_backend`: "auto" = "loop" on CPU, "ragged"
    on TPU/GPU).
    Returns (logits [B, T or 1, X] float32, expert ids [moe layers, B, T, K] or None, updated cache).
    """
    embed = params["embed"]
    h = jnp.take(embed, input_ids, axis=0).astype(dtype)
    if image_features is not None:
        from .vision import scatter_image_features

        h = scatter_image_features(h, input_ids, image_features, image_token_index)
    if mesh is not None:
        from .sharding import batch_spec

        h = jax.lax.with_sharding_constraint(h, jax.sharding.NamedSharding(mesh, batch_spec(mesh, h.shape[0], 3)))
    seq_len = jnp.max(jnp.where(key_valid, positions, 0), axis=-1) + 1  # [B] (dynamic and longrope rope)
    cos, sin = rope_cos_sin(cfg, positions, seq_len)
    qscale = llama4_query_scale(cfg, positions)
    t = input_ids.shape[1]
    if cache is not None:
        cache = dict(cache)
        cache["valid"] = jax.lax.dynamic_update_slice_in_dim(cache["valid"], key_valid, index, axis=1)
    if decode:
        s = cache["valid"].shape[1]
        slot_ok = jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
        mask = cache["valid"][:, None, :] & slot_ok[None]
    else:
        mask = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None] & key_valid[:, None, :]
    expert_ids = None
    moe_backend = resolve_moe_backend(moe_backend, mesh)
    for name, _, moe in layer_groups(cfg):
        layer = _layer(cfg, moe, dtype, param_dtype, mesh, moe_backend)
        group_cache = None if cache is None else cache[name]

        def body(h, xs, layer=layer):
            p, lc = xs
            h, (ids, lc) = layer.apply({"params": p}, h, cos, sin, qscale, mask, lc, index, decode)
            return h, (ids, lc)

        if isinstance(params[name], list):
            outs = []
            for i, p in enumerate(params[name]):
                lc = None if group_cache is None else (group_cache[0][i], group_cache[1][i])
                h, out = body(h, (p, lc))
                outs.append(out)
            ids = None if not moe else jnp.stack([o[0] for o in outs])
            new_cache = None if group_cache is None else tuple(jnp.stack([o[1][j] for o in outs]) for j in range(2))
        else:
            h, (ids, new_cache) = jax.lax.scan(body, h, (params[name], group_cache))
        if cache is not None:
            cache[name] = new_cache
        expert_ids = ids if moe else expert_ids
    if last_only:
        h = h[:, -1:]
    elif logits_at is not None:
        h = jnp.take_along_axis(h, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    h = RMSNorm(cfg, dtype, param_dtype, None, cfg.rms_norm_eps).apply({"params": params["final_norm"]}, h)
    head = embed if cfg.tie_word_embeddings else params["lm_head"]  # [X, D]: XLA:CPU's small-batch matmul is
    # faster against this (HF's) layout than against [D, X]
    return jnp.einsum("btd,xd->btx", h, head.astype(dtype)).astype(jnp.float32), expert_ids, cache
