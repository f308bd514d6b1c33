"""The MoE router and the routed experts' kernels ("loop" for CPU, "ragged" for TPU/GPU), plain or
expert-parallel under `shard_map`.

T tokens, D hidden, E experts (held here), K top-k, F expert hidden.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ..config import Mistral4Config
from ..sharding import DEFAULT_RULES, ShardingRules, mesh_platform
from ..weights.lora import LoraWeight
from ..weights.quant import QuantArray, dequantize, qeinsum

Array = jax.Array
Weight = Array | QuantArray


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
    return "loop" if mesh_platform(mesh) == "cpu" else "ragged"


def _expert_weight(w: Weight, i: Array, layer: Array | None = None) -> Weight:
    """Expert i's slice of w [E, ...], or of layer `layer`'s experts in w [Lg, E, ...] (i and layer may be traced;
    a `QuantArray`'s values and its scale alike): one dynamic slice, which XLA fuses into the matmul that reads it."""
    def pick(a: Array) -> Array:
        start = (i,) if layer is None else (layer, i)
        starts = tuple(jnp.asarray(v, jnp.int32) for v in start) + (jnp.int32(0),) * (a.ndim - len(start))
        return jax.lax.dynamic_slice(a, starts, (1,) * len(start) + a.shape[len(start):]).reshape(a.shape[len(start):])
    return jax.tree_util.tree_map(pick, w)


def _layer_weight(w: Weight, layer: Array | None) -> Weight:
    """w [E, ...] itself, or layer `layer`'s [E, ...] of w [Lg, E, ...]."""
    if layer is None:
        return w
    return jax.tree_util.tree_map(functools.partial(jax.lax.dynamic_index_in_dim, index=layer, keepdims=False), w)


def _expert_mlp(x: Array, g: Weight, u: Weight, d: Weight, act: Any) -> Array:
    """One expert's gated MLP down(act(gate x) * up x): x [R, D], g/u [D, F], d [F, D] (stored dtype or
    `QuantArray`, read in x's dtype by `qeinsum`) -> [R, D]."""
    return qeinsum("rf,fd->rd", act(qeinsum("rd,df->rf", x, g)) * qeinsum("rd,df->rf", x, u), d)


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


GATHER_MAX_TOKENS = 64
"""The "ragged" backend reads the chosen experts one by one (`_experts_gathered`) up to this many tokens
(decode batches), and runs grouped matmuls past it. A slot puts every token through one expert: its
compute (2 x tokens x the expert's weights) passes its read time (the FP8 weights / HBM bandwidth) at about
120 tokens on TPU v5e (100 on an H200), while grouped matmuls read every expert held, dequantised (on v5e-16,
B=64 decode: 3x the bytes of the FP8 experts)."""

EXPERT_CHUNK_ROWS = 64
"""Rows per matmul in the "loop" backend: an expert with more copies runs in chunks of this many."""


def routed_experts(
    x: Array, ids: Array, weights: Array, gate: Weight, up: Weight, down: Weight, first_expert: Array | int = 0,
    act: Any = jax.nn.silu,
    backend: str = "loop", rows: int | None = None, layer: Array | None = None,
) -> Array:
    """Weighted sum of the chosen experts' gated MLPs `down(act(gate x) * up x)`, exact (no token is dropped,
    no capacity).

    x [T, D]; ids, weights [T, K]; gate, up [E, D, F]; down [E, F, D] -> [T, D] (x's dtype).
    The expert weights may be in their storage dtype or `QuantArray`s (FP8 with [E, 1, 1] scales); they are
    dequantised to x's dtype where they are read.
    The experts held here are `first_expert .. first_expert + E - 1` (all of them unless sharded);
    assignments to other experts contribute zero.
    `layer`: gate, up, down hold a layer group's experts [Lg, E, ...] and this is layer `layer` of them. A layer
    scan passes the stacks whole: the loop and decode kernels then slice each chosen expert straight out of
    them, whereas slicing the layer first makes XLA copy all E of its experts on every step (their uses sit
    inside conditionals and loops, where the slice cannot fuse into the matmuls).

    `backend` ("loop" or "ragged", see `resolve_moe_backend`) picks the kernel; both give the same
    result. "loop" (`_experts_loop`, the CPU's) traces a loop over the chosen experts. "ragged" has
    static shapes only, chosen by shape: with at most `GATHER_MAX_TOKENS` tokens or as many token copies
    as experts held (T*K <= E) `_experts_gathered` reads only the chosen experts; otherwise
    `_experts_ragged` runs one grouped matmul (`jax.lax.ragged_dot`) per projection over the copies
    sorted by expert, `rows` of them at a time (None = all T*K at once).
    """
    if backend == "loop":
        return _experts_loop(x, ids, weights, gate, up, down, first_expert, act, layer)
    if backend != "ragged":
        raise ValueError(f"routed_experts: backend must be 'loop' or 'ragged', got {backend!r}")
    if ids.size <= gate.shape[-3] or x.shape[0] <= GATHER_MAX_TOKENS:
        return _experts_gathered(x, ids, weights, gate, up, down, first_expert, act, layer)
    gate, up, down = (_layer_weight(w, layer) for w in (gate, up, down))  # grouped matmuls read every expert
    return _experts_ragged(x, ids, weights, gate, up, down, first_expert, act, rows)


def _experts_loop(x: Array, ids: Array, weights: Array, gate: Weight, up: Weight, down: Weight,
                  first_expert: Array | int, act: Any, layer: Array | None) -> Array:
    """`routed_experts` for CPU: the T*K token copies are sorted by expert. A loop over the experts that
    some copy chose (the others' weights are never read) runs each one on its own rows,
    R = min(`EXPERT_CHUNK_ROWS`, T) at a time (an inner loop); the last chunk is padded only up to the
    next power of two (a `lax.switch` over a few static matmul shapes; its extra rows belong to the next
    expert, which overwrites them). Outputs land in sorted order; the copies are then weighted and summed
    per token. On CPU this beats batched einsums over a fixed capacity, which compute every expert at the
    busiest one's size, and `ragged_dot`, which XLA:CPU runs as a dense matmul masked per expert.
    """
    t, k = ids.shape
    e, dim = gate.shape[-3], x.shape[1]
    valid, flat, counts = _local_copies(ids, e, first_expert)
    order, back = _sort_by_expert(flat, e)
    starts = jnp.cumsum(counts) - counts
    chosen = jnp.nonzero(counts > 0, size=e, fill_value=0)[0]
    rows = min(EXPERT_CHUNK_ROWS, t)
    tiers = tuple(1 << j for j in range(rows.bit_length()) if 1 << j < rows) + (rows,)
    xs = jnp.concatenate([x[order // k], jnp.zeros((rows, dim), x.dtype)])  # [T*K + R, D] sorted copies

    def expert(n: Array, out: Array) -> Array:
        i = chosen[n]
        g, u, d = (_expert_weight(w, i, layer) for w in (gate, up, down))

        def tier(r: int) -> Any:
            def run(start: Array) -> Array:  # [r, D] rows from `start`, zero-padded to [R, D]
                xr = jax.lax.dynamic_slice_in_dim(xs, start, r)
                return jnp.pad(_expert_mlp(xr, g, u, d, act), ((0, rows - r), (0, 0)))
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


def _experts_gathered(x: Array, ids: Array, weights: Array, gate: Weight, up: Weight, down: Weight,
                      first_expert: Array | int, act: Any, layer: Array | None) -> Array:
    """`routed_experts` for few tokens (decode): reads only the chosen experts' weights.

    The U = min(T*K, E) slots hold the distinct chosen experts held here (unused slots: -1). Each slot is one
    `lax.cond`: if used, its expert's three matrices are sliced out of the stacked arrays, dequantised
    and applied to all T tokens, weighted by each token's routing weight for that expert (0 for tokens
    that did not choose it); else nothing is read. Static shapes, no loop: the compiler counts every slot
    as taken (U experts, the most a chip may have to read). A grouped matmul would read (and, FP8 on TPU,
    convert) every expert held: `ragged_dot` on TPU v5e, 4 rows against 16 FP8 experts of 4096 x 1024,
    reports 320 MiB accessed against 4 MiB for one sliced expert.
    """
    t, k = ids.shape
    e = gate.shape[-3]
    valid, flat, counts = _local_copies(ids, e, first_expert)
    chosen = jnp.nonzero(counts > 0, size=min(t * k, e), fill_value=-1)[0]  # [U] distinct experts held here
    combine = jnp.zeros((t, e + 1), x.dtype).at[jnp.arange(t)[:, None], flat.reshape(t, k)].add(
        jnp.where(valid, weights, 0).astype(x.dtype))[:, :e]  # [T, E] routing weight per (token, expert)

    def slot(i: Array) -> Array:
        g, u, d = (_expert_weight(w, i, layer) for w in (gate, up, down))
        w = jax.lax.dynamic_index_in_dim(combine, i, axis=1)  # [T, 1]
        return _expert_mlp(x, g, u, d, act) * w

    out = jnp.zeros_like(x)
    for n in range(chosen.shape[0]):
        out = out + jax.lax.cond(chosen[n] >= 0, slot, lambda i: jnp.zeros_like(x), chosen[n])
    return out


def _experts_ragged(x: Array, ids: Array, weights: Array, gate: Weight, up: Weight, down: Weight,
                    first_expert: Array | int, act: Any,
                    rows: int | None) -> Array:
    """`routed_experts` as grouped matmuls: the token copies held here, sorted by expert, go through
    `jax.lax.ragged_dot` once per projection (gate, up, down), `rows` copies at a time (static shapes;
    None = all T*K copies in one call); copies not held here sort last and are never in a group.
    The stacked weights are dequantised once (FP8 on TPU: converted to the compute dtype anyway, as
    `ragged_dot` does not fuse the conversion). With `rows` < T*K (expert shards: each holds about
    T*K / shards copies) a scan over the ceil(T*K / rows) possible chunks runs the ceil(held copies / rows)
    that hold copies (`lax.cond`), usually one; XLA's cost analysis counts one call, i.e. `rows` copies. (A
    scan of static length, not a `while_loop`, so that training can differentiate it.) Outputs land in sorted order; each token then
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
    g, u, d = (dequantize(w, x.dtype) for w in (gate, up, down))

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
    needed = (jnp.sum(counts) + rows - 1) // rows  # chunks holding copies; the rest are skipped

    def maybe(out: Array, c: Array) -> tuple[Array, None]:  # a scan of static length: reverse-differentiable
        return jax.lax.cond(c < needed, chunk, lambda c, out: out, c, out), None

    return jax.lax.scan(maybe, out, jnp.arange(chunks))[0].astype(x.dtype)


EXPERT_ROWS_SLACK = 1.25
"""Grouped matmuls on an expert shard take this times its even share of the token copies per call."""


def sharded_routed_experts(mesh: Mesh, x: jax.Array, ids: jax.Array, weights: jax.Array,
                           gate: Weight, up: Weight, down: Weight,
                           act: Any = jax.nn.silu, backend: str = "loop",
                           rules: ShardingRules = DEFAULT_RULES, layer: Array | None = None) -> jax.Array:
    """Expert-parallel `routed_experts` under `shard_map`: x [T, D] -> [T, D].

    The specs follow `rules`: experts over its "experts" axis, their hidden units over its "expert_mlp"
    axis, tokens over its "batch" axis; below, the default layout (`sharding.DEFAULT_RULES`).
    Each (expert, tensor) shard holds E/expert experts with F/tensor of their hidden units and computes
    them for every token routed to them (tokens are replicated across `expert` and `tensor`, split over
    `data`); one `psum` over ("expert", "tensor") adds the partial outputs. We chose psum over an
    all-to-all dispatch: it needs no capacity or token reordering across devices, drops nothing, and
    at the batch sizes of inference (decode: B tokens per step) the all-reduce of a [T, D] activation
    per layer costs less than moving the expert weights; an all-to-all pays off for large prefill
    batches on many expert shards.

    `backend` is `routed_experts`' kernel. With "ragged" and more token copies than experts per shard,
    each shard's grouped matmuls take `EXPERT_ROWS_SLACK` x its even share (T*K / expert shards) of
    the copies per call, looping in the rare case that more were routed to it. `layer`: as in
    `routed_experts` (the weights stacked [Lg, E, ...], not split over the layer axis).
    """
    e_ax, f_ax, tok = rules.get("experts"), rules.get("expert_mlp"), rules.get("batch")
    ep = mesh.shape[e_ax] if e_ax else 1
    local = gate.shape[-3] // ep
    tok = tok if tok and x.shape[0] % mesh.shape[tok] == 0 else None
    stack = () if layer is None else (None,)
    up_spec = P(*stack, *rules.spec(("experts", None, "expert_mlp"), "the routed experts' gate/up"))
    down_spec = P(*stack, *rules.spec(("experts", "expert_mlp", None), "the routed experts' down"))

    manual = tuple(a for a in (e_ax, f_ax) if a)
    t_local = x.shape[0] // (mesh.shape[tok] if tok else 1)
    rows = -(-int(t_local * ids.shape[1] * EXPERT_ROWS_SLACK) // ep // 8) * 8

    def body(x, ids, weights, gate, up, down, layer):
        # tokens are the same on every expert/tensor shard; mark them as varying there so that values
        # mixing tokens and local weights (e.g. the expert loop and its lax.switch) have one type
        x, ids, weights = (_vary(a, manual) for a in (x, ids, weights))
        first = jax.lax.axis_index(e_ax) * local if e_ax else 0
        y = routed_experts(x, ids, weights, gate, up, down, first_expert=first, act=act, backend=backend,
                           rows=rows, layer=layer)
        return jax.lax.psum(y, manual)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(tok, None), P(tok, None), P(tok, None), _expert_spec(gate, up_spec), _expert_spec(up, up_spec),
                  _expert_spec(down, down_spec), None if layer is None else P()),
        out_specs=P(tok, None),
    )(x, ids, weights, gate, up, down, layer)


def _expert_spec(w: Weight, spec: P) -> Any:
    """shard_map spec of a stacked expert weight: `spec`; a `QuantArray`'s [(Lg,) E, 1, 1] scale split over experts
    only; a `LoraWeight`'s factors a [(Lg,) E, in, r] and b [(Lg,) E, r, out] as the base on the dimensions they keep."""
    if isinstance(w, LoraWeight):
        return LoraWeight(_expert_spec(w.base, spec), P(*spec[:-1], None), P(*spec[:-2], None, spec[-1]), w.scale)
    return QuantArray(spec, P(*spec[:-2], None, None)) if isinstance(w, QuantArray) else spec


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark a shard_map value as varying over `axes` (a no-op on jax versions without varying types)."""
    if not axes:
        return x
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(x, axes)
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return x
