"""Memory plan from abstract shapes only (nothing is allocated): weights and KV cache per device.

Per parameter, the bytes on one device are its bytes divided by the sizes of the mesh axes its
logical axes map to (`rules`, default `sharding.DEFAULT_RULES`); replicated dimensions count in full.
The KV cache holds kv_lora + qk_rope numbers per token per layer; each of its dimensions is split over
the mesh axis its logical axis (`model.CACHE_AXES`) maps to, where that axis divides it, as
`model.cache_shardings` places it: the rows over "cache_batch" (`data`), the slots over "cache_seq"
(`expert` in `DEFAULT_RULES`). What fits leaves `reserve` of every device for activations, compiled code
and fragmentation: the largest batch x context at the plan's batch, and per batch size the largest
context (`max_context`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Mistral4Config
from ..model import CACHE_AXES, abstract_params, layer_groups, param_axes
from ..sharding import DEFAULT_RULES, MESH_AXES, ShardingRules, check_divisible
from ..weights.quant import is_quant

GiB = 1024**3
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}

CONTEXT_BATCHES = (1, 8, 32, 128)
"""The batch sizes `max_context` reports by default."""

ACCELERATORS = {
    # name: (chips, HBM bytes per chip, mesh for the real model)
    "TPU v5e-16": (16, 16 * GiB, {"data": 1, "expert": 8, "tensor": 2}),
    "TPU v5p-8": (4, 95 * GiB, {"data": 1, "expert": 4, "tensor": 1}),
    "TPU v6e-8": (8, 32 * GiB, {"data": 1, "expert": 8, "tensor": 1}),
    "2x H200": (2, 141 * 10**9, {"data": 1, "expert": 2, "tensor": 1}),
}
"""The hardware the README's memory table covers (HBM per chip as sold; v5p-8 = 4 chips)."""


def parse_bytes(text: str) -> int:
    """"16GiB", "80GB", "1.5 TiB", "123" -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 16GiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """21.7 GiB, 6.0 KiB, 512 bytes (binary units)."""
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n):,} bytes"


@dataclasses.dataclass
class MemoryPlan:
    mesh: dict[str, int]
    dtype: str
    cache_dtype: str
    params: int
    weight_bytes_total: int
    weight_bytes_per_device: int
    kv_bytes_per_token: int
    kv_bytes_per_device: int
    batch: int
    context: int
    hbm_per_device: int | None
    max_tokens_per_device: int | None  # batch x context of the KV cache that fits (after weights and reserve)
    fits: bool | None
    max_context: dict[int, int] | None  # batch size -> the largest context that fits (`max_context`)
    window: int | None  # the model's longest sequence (max_position_embeddings; None: no limit)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def memory_plan(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any = jnp.bfloat16, cache_dtype: Any = None,
                batch: int = 1, context: int = 8192, hbm_per_device: int | None = None, reserve: float = 0.1,
                rules: ShardingRules = DEFAULT_RULES) -> MemoryPlan:
    """Bytes per device for weights and KV cache on a mesh of `mesh` sizes (see module docstring)."""
    mesh = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    total, per_device = _weight_bytes(cfg, mesh, dtype, rules)
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(cfg, dtype), is_leaf=is_quant))
    cache_dtype = _cache_dtype(dtype, cache_dtype)
    kv_device = cache_bytes_per_device(cfg, mesh, batch, context, cache_dtype, rules)
    max_tokens = fits = contexts = None
    if hbm_per_device is not None:
        free = hbm_per_device * (1 - reserve) - per_device
        max_tokens = batch * slots_that_fit(cfg, mesh, batch, free, cache_dtype, rules)
        fits = free >= kv_device
        contexts = max_context(cfg, mesh, dtype, cache_dtype, hbm_per_device, rules=rules, reserve=reserve)
    return MemoryPlan(mesh, jnp.dtype(dtype).name, jnp.dtype(cache_dtype).name, count, total, per_device,
                      _kv_bytes_per_token(cfg, cache_dtype), kv_device, batch, context, hbm_per_device, max_tokens, fits,
                      contexts, cfg.max_length)


def max_context(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any, cache_dtype: Any, hbm_per_device: int,
                batches: Sequence[int] = CONTEXT_BATCHES, rules: ShardingRules = DEFAULT_RULES,
                reserve: float = 0.1) -> dict[int, int]:
    """Batch size -> the largest context (cache slots) whose cache fits one device of `mesh` next to its
    weights, leaving `reserve` of `hbm_per_device` free (`slots_that_fit`; compare with `cfg.max_length`).
    cache_dtype None: as `memory_plan`."""
    mesh = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    free = hbm_per_device * (1 - reserve) - _weight_bytes(cfg, mesh, dtype, rules)[1]
    cache_dtype = _cache_dtype(dtype, cache_dtype)
    return {b: slots_that_fit(cfg, mesh, b, free, cache_dtype, rules) for b in batches}


def cache_bytes_per_device(cfg: Mistral4Config, mesh: dict[str, int], batch: int, slots: int, cache_dtype: Any,
                           rules: ShardingRules = DEFAULT_RULES) -> int:
    """Bytes on one device of `mesh` sizes of a `batch` x `slots` latent cache (every layer's latent [B, S, L]
    and k_rope [B, S, R]), split as the module docstring says. The `valid` flags (1 byte per slot and
    row) are left out."""
    item = jnp.dtype(cache_dtype).itemsize
    total = 0
    for _, n, _ in layer_groups(cfg):
        for kind, width in (("latent", cfg.kv_lora_rank), ("k_rope", cfg.qk_rope_head_dim)):
            shape = (n, batch, slots, width)
            axes = zip(rules.spec(CACHE_AXES[kind], f"cache {kind}"), shape)
            total += math.prod(shape) * item // math.prod(mesh.get(a, 1) for a, d in axes if a and d % mesh.get(a, 1) == 0)
    return total


def slots_that_fit(cfg: Mistral4Config, mesh: dict[str, int], batch: int, free: float, cache_dtype: Any,
                   rules: ShardingRules = DEFAULT_RULES) -> int:
    """The most slots of a `batch`-row cache that fit `free` bytes per device, a multiple of the size m of
    the "cache_seq" mesh axis (so that the slots split over it; 0 when m slots do not fit). Exact: the
    bytes of k x m slots are k times those of m."""
    axis = rules.get("cache_seq")
    m = mesh.get(axis, 1) if axis else 1
    return max(0, int(free // cache_bytes_per_device(cfg, mesh, batch, m, cache_dtype, rules))) * m


def _weight_bytes(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any, rules: ShardingRules) -> tuple[int, int]:
    """(bytes in all, bytes on one device) of every parameter."""
    sizes = [_leaf_bytes(leaf, names, mesh, rules, key) for key, leaf, names in _param_leaves(cfg, dtype, mesh, rules)]
    return sum(t for t, _ in sizes), sum(d for _, d in sizes)


def _param_leaves(cfg: Mistral4Config, dtype: Any, mesh: dict[str, int],
                  rules: ShardingRules) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(key path, ShapeDtypeStruct, logical axes) of every array (a `QuantArray`'s values and scale apart);
    ValueError if the mesh does not divide one."""
    abstract = abstract_params(cfg, dtype)
    axes = param_axes(cfg, dtype)
    check_divisible(abstract, axes, mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    axis_leaves = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    return [(jax.tree_util.keystr(path), leaf, names) for (path, leaf), names in zip(leaves, axis_leaves)]


def _leaf_bytes(leaf: Any, names: tuple[str, ...], mesh: dict[str, int], rules: ShardingRules,
                what: str) -> tuple[int, int]:
    """(bytes in all, bytes on one device) of parameter `what` whose dims carry logical `names`."""
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    split = 1
    for axis in rules.spec(names, what):
        if axis:
            split *= mesh[axis]
    return nbytes, -(-nbytes // split)


def _cache_dtype(dtype: Any, cache_dtype: Any) -> Any:
    """The KV cache dtype: as given, else bfloat16 for FP8 weights, else the weights' dtype."""
    return cache_dtype or (jnp.bfloat16 if jnp.dtype(dtype).itemsize < 2 else dtype)


def _kv_bytes_per_token(cfg: Mistral4Config, cache_dtype: Any) -> int:
    layers = sum(n for _, n, _ in layer_groups(cfg))
    return layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(cache_dtype).itemsize


@dataclasses.dataclass
class DecodeReads:
    """Bytes one device must read from its memory for one decode step (all layers).

    weights: its shard of every weight except the routed experts (embedding: only the batch's rows,
    unless tied to the head); experts_expected / experts_worst: the routed experts it holds that the
    batch chooses, expected (uniform routing) and at worst; cache: its slice of the KV cache."""

    weights: int
    experts_expected: int
    experts_worst: int
    cache: int
    experts_read_expected: float  # routed experts read per layer on this device
    experts_read_worst: int

    @property
    def expected(self) -> int:
        return self.weights + self.experts_expected + self.cache

    @property
    def worst(self) -> int:
        return self.weights + self.experts_worst + self.cache


def decode_reads(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any = jnp.bfloat16, cache_dtype: Any = None,
                 batch: int = 1, context: int = 8192, rules: ShardingRules = DEFAULT_RULES) -> DecodeReads:
    """What one device of `mesh` must read per decode step of `batch` rows over a `context`-slot cache.

    Each device holds local = E / expert routed experts per layer (F split over `tensor`). A token picks
    K of the E experts; for B tokens the distinct experts chosen among one device's are, at worst,
    min(local, B * K) and, with uniform independent routing, local * (1 - (1 - K/E)^B) on average
    (K / expert at batch 1: 0.5 for top-4 of 128 over 8 expert shards).
    """
    mesh = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    local = e // mesh[rules.get("experts")] if rules.get("experts") else e
    expected = local * (1 - (1 - k / e) ** batch)
    worst = min(local, batch * k)
    weights = experts = 0
    for key, leaf, names in _param_leaves(cfg, dtype, mesh, rules):
        _, device = _leaf_bytes(leaf, names, mesh, rules, key)
        if "experts" in names:
            experts += device
        elif key == "['embed']" and not cfg.tie_word_embeddings:
            weights += batch * leaf.shape[1] * np.dtype(leaf.dtype).itemsize
        else:
            weights += device
    kv_device = cache_bytes_per_device(cfg, mesh, batch, context, _cache_dtype(dtype, cache_dtype), rules)
    return DecodeReads(weights, int(experts * expected / local), experts * worst // local, kv_device, expected, worst)


def prefill_flops(cfg: Mistral4Config, mesh: dict[str, int], batch: int = 1, tokens: int = 4096,
                  rules: ShardingRules = DEFAULT_RULES) -> tuple[float, float]:
    """(causal, square) flops one device of `mesh` must compute for a prefill chunk of `batch` x `tokens`
    (no cached prefix; logits of the last token only).

    2 x tokens x its share of every matmul weight (the embedding is a lookup; the lm_head runs on one token
    per row), plus the routed experts: tokens x K copies, each through one expert, spread evenly over the
    expert shards; plus attention: scores (qk_nope + qk_rope dims) and values (v dims) for its heads over
    (tokens + 1) / 2 keys per query (causal) or over all `tokens` (square: what a kernel without causal
    block skipping computes).
    """
    mesh = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    n = batch * tokens
    e_ax, h_ax = rules.get("experts"), rules.get("heads")
    ep = mesh[e_ax] if e_ax else 1
    flops = 0.0
    for key, leaf, names in _param_leaves(cfg, jnp.float32, mesh, rules):
        if len(leaf.shape) < 2 or key.endswith(".scale") or (key == "['embed']" and not cfg.tie_word_embeddings):
            continue
        _, device = _leaf_bytes(leaf, names, mesh, rules, key)
        elements = device / 4  # float32 leaves
        if "experts" in names:  # [layers, E, ...]: one expert's share per token copy, E/ep experts held
            flops += 2.0 * n * cfg.num_experts_per_tok / ep * elements / (leaf.shape[1] / ep)
        elif key == "['lm_head']" or (key == "['embed']" and cfg.tie_word_embeddings):
            flops += 2.0 * batch * elements
        else:
            flops += 2.0 * n * elements
    heads = cfg.num_attention_heads / (mesh[h_ax] if h_ax else 1)
    per_key = 2.0 * n * heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return flops + per_key * (tokens + 1) / 2, flops + per_key * tokens


def format_plan(p: MemoryPlan) -> str:
    """A short human-readable summary."""
    mesh = ",".join(f"{a}={p.mesh[a]}" for a in MESH_AXES)
    lines = [
        f"mesh {mesh} · weights {p.dtype} · cache {p.cache_dtype}",
        f"parameters           {p.params / 1e9:,.2f} B ({p.weight_bytes_total / GiB:,.1f} GiB in all)",
        f"weights per device   {p.weight_bytes_per_device / GiB:,.2f} GiB",
        f"KV cache per token   {p.kv_bytes_per_token:,} bytes (all layers)",
        f"KV per device        {p.kv_bytes_per_device / GiB:,.3f} GiB for batch {p.batch} x context {p.context}",
    ]
    if p.hbm_per_device is not None:
        lines.append(f"memory per device    {p.hbm_per_device / GiB:,.1f} GiB -> "
                     + ("fits" if p.fits else "does NOT fit")
                     + f"; largest batch x context: {p.max_tokens_per_device:,} tokens")
    if p.max_context:
        lines += format_contexts(p.max_context, p.window, "largest context per device (after weights and reserve):")
    return "\n".join(lines)


def format_contexts(contexts: dict[int, int], window: int | None, title: str) -> list[str]:
    """The lines of a batch size -> largest context table under `title`, each saying whether it reaches `window`."""
    lines = [title]
    for b, c in contexts.items():
        reach = "" if window is None else (f"  (the whole {window:,}-token window)" if c >= window else
                                           f"  ({c / window:.0%} of the {window:,}-token window)")
        lines.append(f"  batch {b:>4}  {c:>13,} tokens{reach}")
    return lines
