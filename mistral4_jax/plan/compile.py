"""Compile the model ahead of time for a TPU topology or NVIDIA GPUs on any machine, and read the figures.

    plan = compile_plan("configs/mistral-small-4-119b.json", "v5e-16", mesh="expert=8,tensor=2",
                        dtype="float8_e4m3fn", batch=1, context=4096)
    print(format_compiled(plan))          # or `mistral4-jax plan --compile v5e-16 ...`

Nothing is allocated: parameters and KV cache are `jax.ShapeDtypeStruct`s carrying the `NamedSharding`s of
`rules` (default `sharding.DEFAULT_RULES`) on a mesh of the target's devices
(`jax.experimental.topologies`), and `jax.jit(step).lower(...).compile()` runs XLA's TPU or GPU compiler
on this machine. TPU targets need libtpu (the `tpu-aot` extra), GPU targets jax's CUDA plugin (the
`gpu-aot` extra, ~5.5 GB).

Two programs are compiled per target: one decode step (B tokens attending a `context`-slot latent cache,
the cache donated) and one prefill chunk (B x T tokens written into the cache at slot 0, last logits only).

What the figures are (all per device):
- memory: the compiler's argument / output / temporary bytes (`memory_analysis`) of the program as it
  runs (layer groups stacked under `lax.scan`), against the chip's memory. The TPU compiler refuses a
  program that does not fit (RESOURCE_EXHAUSTED); that is reported as "does not fit" with its figure. A
  GPU compiler does not check: there "fits" compares the total with the card's memory.
- weights: the compiler's argument bytes of the parameters alone (a program that takes them and
  returns a constant); `plan.memory_plan` computes the same from shapes alone, and the two should agree.
- flops, bytes accessed, collectives: XLA counts a loop body once, so the scanned program shows one
  layer. These figures come from two more compiles with the layers unrolled, at one and two layers per
  group: total = one-layer program + (layers - 1) x (two-layer - one-layer program); with
  `layer_loop="unroll"` the one program is compiled unrolled and read directly. A data-dependent loop
  inside a layer (an expert loop) is still counted once: `cost_exact` is False when the per-layer
  program has a `while` loop, and its flops and bytes are then lower bounds. GPU compilers give no cost
  analysis (None). A collective's bytes are the size of its result on one device. These compiles run the
  prefill attention through XLA in one block (a fused kernel's flops are invisible to the cost analysis),
  so they count it whole (T x T), where the TPU kernel skips the blocks above the diagonal.
- HBM bytes: what the program as it runs (scanned layers, loops times their trip counts) reads and writes
  in HBM per step, walked from its HLO (`hlo.hbm_bytes`: VMEM-resident operands excluded, sliced operands
  counted as slices, the costlier branch of each conditional). XLA's "bytes accessed" counts prefetched
  weights several times and loop bodies once; this is the figure to hold against the must-read bytes.
  TPU targets only: on GPU programs the walk undercounts (8xH200 decode: 1.9 GB against 3.3 GiB must-read).
- decode reads: the bytes one chip must read per decode step (`plan.decode_reads`: its weight shards,
  the experts the batch picks among the ones it holds, expected and worst case, its cache slice).
  Roofline: step ms = max(bytes / HBM bandwidth, flops / peak bf16 flops), with the expected reads
  (decode) or the compiled bytes (prefill); tokens/s = tokens per step / step time. Collectives are
  not in the roofline.
- largest context (`compiled_max_context`), per batch size 1 and 8, from the compiled decode step: its fixed bytes
  are its total less its cache, where the cache bytes are the analytic per-device figure
  (`plan.memory.cache_bytes_per_device`; the compiled argument bytes less the weights' hold that and the
  `valid` flags), and each batch size gets the most slots whose cache fits the chip's memory less the
  fixed bytes (`plan.memory.slots_that_fit`: the per-row cache scaled by the batch, split as
  `cache_shardings` places it). Temporaries and outputs count as fixed at the compiled batch and context
  (a decode step's grow with B x S only through its attention scores), so compile near the context asked about.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import model as M
from ..api import resolve_dtype
from ..config import Mistral4Config
from ..model import cache_shardings, param_shardings
from ..model.layers import ATTN_BLOCK
from ..sharding import DEFAULT_RULES, MESH_AXES, ShardingRules, batch_spec, make_mesh, parse_mesh
from .memory import GiB, cache_bytes_per_device, decode_reads, format_contexts, memory_plan, prefill_flops, slots_that_fit
from .hlo import hbm_bytes, parse_collectives
from .targets import Target, default_mesh, parse_target, target_devices

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class Collective:
    kind: str  # all-reduce, all-gather, all-to-all, reduce-scatter, collective-permute, ...
    count: int  # per step, all layers
    bytes: int  # sum of the result sizes on one device


@dataclasses.dataclass
class StepFigures:
    """One compiled program (decode step or prefill chunk); bytes and flops per device."""

    step: str  # "decode" or "prefill"
    batch: int
    tokens: int  # query tokens per row (1 for decode)
    context: int  # cache slots
    fits: bool
    compile_s: float
    error: str | None = None  # the compiler's reason when the program does not fit
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None  # outputs that reuse a donated argument's memory (the cache)
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None  # arguments + outputs - aliased + temporaries + code
    flops: float | None = None  # all layers (see module docstring)
    bytes_accessed: float | None = None
    cost_exact: bool | None = None  # False: a loop inside a layer was counted once (lower bounds)
    cost_compile_s: float | None = None  # the two unrolled compiles that give flops, bytes, collectives
    hbm_bytes: float | None = None  # moved through HBM per step by the program as it runs (`hlo.hbm_bytes`)
    collectives: list[Collective] | None = None
    flops_needed: float | None = None  # prefill: flops this chip must compute, causal (plan.prefill_flops)
    reads_expected: int | None = None  # decode: bytes this chip must read per step (plan.decode_reads)
    reads_worst: int | None = None
    roofline_ms: float | None = None  # per step
    tokens_per_s: float | None = None


@dataclasses.dataclass
class CompiledPlan:
    config: str
    target: str
    kind: str
    chips: int
    hbm_bytes: int
    hbm_bandwidth: float
    peak_flops: float
    mesh: dict[str, int]
    dtype: str
    compute_dtype: str
    cache_dtype: str
    layers: int
    layer_loop: str
    weight_bytes: int  # the compiler's argument bytes of the parameters per device
    plan_weight_bytes: int  # plan.memory_plan's weights per device (abstract shapes)
    steps: list[StepFigures]
    max_context: dict[int, int] | None = None  # batch size -> the largest context that fits (module docstring)
    window: int | None = None  # the model's longest sequence (max_position_embeddings)
    jax_version: str = jax.__version__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def step(self, name: str) -> StepFigures:
        return next(s for s in self.steps if s.step == name)


# ------------------------------------------------------------------------------------------ compile
def _abstract(shapes: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _unstacked(params: Any) -> Any:
    """Abstract stacked layer groups [n, ...] as lists of n per-layer trees (the unrolled layout)."""
    def layer(x: Any) -> Any:
        spec = P(*tuple(x.sharding.spec)[1:])
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=NamedSharding(x.sharding.mesh, spec))

    out = dict(params)
    for name in ("layers_dense", "layers_moe"):
        if name not in params:
            continue
        n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
        out[name] = [jax.tree_util.tree_map(layer, params[name]) for _ in range(n)]
    return out


def _step(params, cache, tokens, positions, index, *, cfg, dtype, compute_dtype, mesh, decode, rules, attn_block,
          attn_backend):
    """One decode step (decode=True) or prefill chunk written at slot `index`: logits, updated cache."""
    logits, _, cache = M.forward(params, cfg, tokens, positions, jnp.ones(tokens.shape, bool), cache=cache, index=index,
                                 decode=decode, last_only=True, dtype=compute_dtype, mesh=mesh,
                                 rules=rules, attn_block=attn_block, attn_backend=attn_backend)
    return logits, cache


def _compiled(cfg: Mistral4Config, mesh: Any, dtype: Any, compute_dtype: Any, cache_dtype: Any, batch: int, tokens: int,
              context: int, decode: bool, unrolled: bool, rules: ShardingRules,
              attn_block: int = ATTN_BLOCK, attn_backend: str = "auto") -> tuple[Any, float]:
    """Compile one step: (the compiled program or the compiler's RESOURCE_EXHAUSTED message, seconds)."""
    params = _abstract(M.abstract_params(cfg, dtype), param_shardings(cfg, mesh, dtype, rules))
    if unrolled:
        params = _unstacked(params)
    cache_shapes = jax.eval_shape(functools.partial(M.init_cache, cfg, batch, context, cache_dtype))
    cache_sh = cache_shardings(mesh, cache_shapes, rules)
    cache = _abstract(cache_shapes, cache_sh)
    rows = NamedSharding(mesh, batch_spec(mesh, batch, 2, rules))
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=rows)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    fn = jax.jit(functools.partial(_step, cfg=cfg, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, decode=decode,
                                   rules=rules, attn_block=attn_block, attn_backend=attn_backend),
                 donate_argnums=1, out_shardings=(NamedSharding(mesh, batch_spec(mesh, batch, 3, rules)), cache_sh))
    log.info("compiling %s: %d layers%s, batch %d x %d tokens, %d-slot cache", "decode" if decode else "prefill",
             cfg.num_hidden_layers, " unrolled" if unrolled else "", batch, tokens, context)
    t0 = time.perf_counter()
    try:
        compiled: Any = fn.lower(params, cache, ids, ids, index).compile()
    except Exception as e:  # XLA's error type differs between jax versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled = " ".join(str(e).split())
    return compiled, time.perf_counter() - t0


def _cost(compiled: Any) -> tuple[float | None, float | None, dict[str, tuple[int, int]], bool]:
    """(flops, bytes accessed, collectives, has a while loop) of one compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    text = compiled.as_text()
    flops = bytes_accessed = None
    if cost:
        flops, bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
    return flops, bytes_accessed, parse_collectives(text), re.search(r"\swhile\(", text) is not None


def _depth_variant(cfg: Mistral4Config, dense: int, moe: int) -> Mistral4Config:
    return cfg.replace(num_hidden_layers=dense + moe, first_k_dense_replace=dense, softmax_scale=cfg.softmax_scale)


def _layer_costs(cfg: Mistral4Config, compile_at: Any) -> tuple[float | None, float | None, list[Collective], bool, float]:
    """Flops, bytes accessed and collectives of all layers from unrolled compiles at one and two layers per
    group: base + sum over groups of (layers - 1) x (two layers - one layer). Also (exact, seconds)."""
    groups = [cfg.first_k_dense_replace, cfg.num_moe_layers]
    base_depth = [min(n, 1) for n in groups]
    t0 = time.perf_counter()
    base = _cost(compile_at(_depth_variant(cfg, *base_depth)))
    flops, nbytes, coll, has_loop = base[0], base[1], dict(base[2]), base[3]
    for g, n in enumerate(groups):
        if n <= 1:  # nothing to extrapolate
            continue
        depth = list(base_depth)
        depth[g] = 2
        two = _cost(compile_at(_depth_variant(cfg, *depth)))
        has_loop = has_loop or two[3]
        if flops is not None and two[0] is not None:
            flops += (n - 1) * (two[0] - base[0])
        if nbytes is not None and two[1] is not None:
            nbytes += (n - 1) * (two[1] - base[1])
        for kind in set(two[2]) | set(base[2]):
            c2, b2 = two[2].get(kind, (0, 0))
            c1, b1 = base[2].get(kind, (0, 0))
            c, b = coll.get(kind, (0, 0))
            coll[kind] = (c + (n - 1) * (c2 - c1), b + (n - 1) * (b2 - b1))
    collectives = [Collective(k, c, b) for k, (c, b) in sorted(coll.items())]
    return flops, nbytes, collectives, not has_loop, time.perf_counter() - t0


def _memory(fig: StepFigures, compiled: Any) -> None:
    m = compiled.memory_analysis()
    fig.argument_bytes, fig.output_bytes = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    fig.alias_bytes, fig.temp_bytes = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    fig.code_bytes = int(m.generated_code_size_in_bytes)
    fig.total_bytes = fig.argument_bytes + fig.output_bytes - fig.alias_bytes + fig.temp_bytes + fig.code_bytes


def _param_argument_bytes(cfg: Mistral4Config, mesh: Any, dtype: Any, rules: ShardingRules) -> int:
    """The compiler's argument bytes per device of the parameters alone (with its padding and layouts):
    a program that takes them and returns a constant."""
    params = _abstract(M.abstract_params(cfg, dtype), param_shardings(cfg, mesh, dtype, rules))
    compiled = jax.jit(lambda p: jnp.zeros((), jnp.int32), keep_unused=True).lower(params).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)


def compile_plan(
    config: str | os.PathLike | Mistral4Config,
    target: str | Target,
    mesh: str | dict[str, int] | None = None,
    dtype: Any = "bfloat16",
    compute_dtype: Any = "bfloat16",
    cache_dtype: Any = None,
    batch: int = 1,
    context: int = 4096,
    chunk: int | None = None,
    steps: Sequence[str] = ("decode", "prefill"),
    layers: int | None = None,
    layer_loop: str = "scan",
    cost: bool = True,
    rules: ShardingRules = DEFAULT_RULES,
) -> CompiledPlan:
    """Compile a decode step and a prefill chunk of `config` for `target` and collect the figures.

    config: a Mistral4Config or a config path (configs/*.json, an HF config.json or directory, a converted
    checkpoint). target: see `parse_target`. mesh: "expert=8,tensor=2" or sizes;
    default `default_mesh`. dtype: weights ("float8_e4m3fn" = FP8 + scales); compute_dtype: activations;
    cache_dtype: default bfloat16 for FP8 weights, else the weights'. Decode: `batch` rows attending a
    `context`-slot cache; prefill: `batch` x `chunk` tokens (default min(context, 4096)) into a cache of
    max(context, chunk) slots: the first chunk of a prompt (attending among itself) when context <= chunk,
    else a chunk of a long prompt prefilled in chunks (`model.forward(decode=True)`, attending to the cache
    before it: the last one reads it all; no cost compiles, XLA counts its while loop once). layers: override the depth (the first_k_dense_replace dense layers are kept
    up to that many). layer_loop: "scan" compiles the program as it runs on accelerators (layers under
    `lax.scan`) and, unless cost=False, takes flops, bytes and collectives from two more compiles with one
    and two unrolled layers per group; "unroll" compiles the layers unrolled and reads them from that one
    program (compile time grows with depth: for reduced-depth models). rules: the layout (`sharding.ShardingRules`).
    """
    cfg = config if isinstance(config, Mistral4Config) else Mistral4Config.from_json(config)
    source = "(given)" if isinstance(config, Mistral4Config) else os.fspath(config)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}")
        dense = min(cfg.first_k_dense_replace, layers)
        cfg = _depth_variant(cfg, dense, layers - dense)
    target = parse_target(target) if isinstance(target, str) else target
    if layer_loop not in ("scan", "unroll"):
        raise ValueError(f"layer_loop must be 'scan' or 'unroll', got {layer_loop!r}")
    for s in steps:
        if s not in ("decode", "prefill"):
            raise ValueError(f"--steps: unknown step {s!r}; steps are decode, prefill")
    if batch < 1 or context < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"batch, context and chunk must be positive, got {batch}, {context}, {chunk}")
    sizes = default_mesh(target, cfg) if mesh is None else mesh
    try:
        sizes = parse_mesh(sizes, target.chips)
    except ValueError as e:
        raise ValueError(f"{target.name} has {target.chips} chips: {e}") from None
    dtype, compute_dtype = resolve_dtype(dtype, "dtype"), resolve_dtype(compute_dtype, "compute dtype")
    cache_dtype = resolve_dtype(cache_dtype, "cache dtype") if cache_dtype is not None else (
        jnp.bfloat16 if M.is_fp8(dtype) else dtype)
    plan = memory_plan(cfg, sizes, dtype, cache_dtype, batch, context, rules=rules)  # also checks the mesh divides the weights
    device_mesh = make_mesh(sizes, devices=target_devices(target))
    weight_bytes = _param_argument_bytes(cfg, device_mesh, dtype, rules)
    chunk = chunk or min(context, 4096)
    figures = []
    for step in steps:
        tokens, slots = (1, context) if step == "decode" else (chunk, max(context, chunk))
        decode = step == "decode" or slots > tokens  # a prefill chunk after a cached prefix (chunked prefill)
        compile_at = functools.partial(_compiled, mesh=device_mesh, dtype=dtype, compute_dtype=compute_dtype,
                                       cache_dtype=cache_dtype, batch=batch, tokens=tokens, context=slots, decode=decode,
                                       rules=rules)
        compiled, seconds = compile_at(cfg, unrolled=layer_loop == "unroll")
        fig = StepFigures(step, batch, tokens, slots, fits=not isinstance(compiled, str), compile_s=round(seconds, 2))
        if isinstance(compiled, str):
            fig.error = compiled
        else:
            _memory(fig, compiled)
            fig.fits = fig.total_bytes <= target.hbm_bytes
            if target.platform == "tpu":  # (read from TPU HLO; GPU programs fuse differently: not modelled)
                fig.hbm_bytes = hbm_bytes(compiled.as_text())
        if step == "decode":
            reads = decode_reads(cfg, sizes, dtype, cache_dtype, batch, slots, rules)
            fig.reads_expected, fig.reads_worst = reads.expected, reads.worst
        elif not decode:
            fig.flops_needed = prefill_flops(cfg, sizes, batch, tokens, rules)[0]
        if cost and fig.error is None and layer_loop == "unroll":
            fig.flops, fig.bytes_accessed, coll, has_loop = _cost(compiled)
            fig.collectives, fig.cost_exact = [Collective(k, c, b) for k, (c, b) in sorted(coll.items())], not has_loop
        elif cost and fig.error is None and not (decode and step == "prefill"):  # (a chunk at the end of a long
            # cache: its attention is a while loop over the cache, which XLA's cost analysis counts once)
            flops, nbytes, fig.collectives, fig.cost_exact, secs = _layer_costs(  # XLA's attention in one block: counted
                cfg, lambda c: compile_at(c, unrolled=True, attn_block=slots, attn_backend="xla")[0])  # whole (not a kernel)
            fig.flops, fig.bytes_accessed, fig.cost_compile_s = flops, nbytes, round(secs, 2)
        moved = fig.reads_expected if step == "decode" else fig.bytes_accessed
        if moved is not None and fig.fits:
            ms = 1e3 * max(moved / target.hbm_bandwidth, (fig.flops or 0) / target.peak_flops)
            fig.roofline_ms, fig.tokens_per_s = ms, batch * tokens * 1e3 / ms
        figures.append(fig)
    decode = next((f for f in figures if f.step == "decode" and f.error is None), None)
    contexts = None if decode is None else compiled_max_context(cfg, sizes, decode, target.hbm_bytes, cache_dtype, rules)
    return CompiledPlan(source, target.name, target.kind, target.chips, target.hbm_bytes, target.hbm_bandwidth,
                        target.peak_flops, sizes, jnp.dtype(dtype).name, jnp.dtype(compute_dtype).name,
                        jnp.dtype(cache_dtype).name, cfg.num_hidden_layers, layer_loop, weight_bytes,
                        plan.weight_bytes_per_device, figures, contexts, cfg.max_length)


def compiled_max_context(cfg: Mistral4Config, mesh: dict[str, int], decode: StepFigures, hbm_bytes: int, cache_dtype: Any,
                rules: ShardingRules = DEFAULT_RULES, batches: Sequence[int] = (1, 8)) -> dict[int, int]:
    """Batch size -> the largest context that fits `hbm_bytes` per chip by the compiled `decode` step's
    figures: its fixed bytes (total less its cache) plus the cache of that batch (module docstring)."""
    fixed = decode.total_bytes - cache_bytes_per_device(cfg, mesh, decode.batch, decode.context, cache_dtype, rules)
    return {b: slots_that_fit(cfg, mesh, b, hbm_bytes - fixed, cache_dtype, rules) for b in batches}


# ------------------------------------------------------------------------------------------ report
def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def format_compiled(p: CompiledPlan) -> str:
    """A short human-readable report of `compile_plan`'s figures."""
    mesh = ",".join(f"{a}={p.mesh[a]}" for a in MESH_AXES)
    lines = [f"{p.target}: {p.chips} x {p.kind}, {_gib(p.hbm_bytes)} at {p.hbm_bandwidth / 1e9:,.0f} GB/s, "
             f"{p.peak_flops / 1e12:,.0f} TFLOP/s bf16 per chip · mesh {mesh} · {p.layers} layer{'s' * (p.layers != 1)} ({p.layer_loop}) · weights {p.dtype}, "
             f"compute {p.compute_dtype}, cache {p.cache_dtype} · jax {p.jax_version}",
             f"weights {_gib(p.weight_bytes)} per chip compiled, {_gib(p.plan_weight_bytes)} in the abstract plan "
             f"({p.weight_bytes / p.plan_weight_bytes:.3f}x)"]
    for s in p.steps:
        what = f"decode  B={s.batch} x {s.context:,} ctx" if s.step == "decode" else \
            f"prefill B={s.batch} x {s.tokens:,} tokens ({s.context:,}-slot cache)"
        if s.error is not None:
            lines.append(f"{what}: does NOT fit (compiled in {s.compile_s:.1f} s): {s.error}")
            continue
        verdict = "fits" if s.fits else "does NOT fit"
        lines.append(f"{what}: {verdict}, {_gib(s.total_bytes)} of {_gib(p.hbm_bytes)} per chip (arguments "
                     f"{_gib(s.argument_bytes)}, temporaries {_gib(s.temp_bytes)}, outputs {_gib(s.output_bytes)}, "
                     f"aliased {_gib(s.alias_bytes)}); compiled in {s.compile_s:.1f} s")
        if s.reads_expected is not None:
            line = f"    must read per step {_gib(s.reads_expected)} expected, {_gib(s.reads_worst)} worst case"
            if s.hbm_bytes is not None:
                line += (f"; the compiled step moves {_gib(s.hbm_bytes)} through HBM ({s.hbm_bytes / s.reads_worst:.2f}x "
                         "the worst case)")
            lines.append(line)
        if s.flops is not None:
            bound = "" if s.cost_exact else " (lower bounds: a loop inside a layer is counted once)"
            accessed = f", {_gib(s.bytes_accessed)} accessed" if s.bytes_accessed is not None else ""
            extra = f"; unrolled compiles {s.cost_compile_s:.1f} s" if s.cost_compile_s is not None else ""
            needed = f" ({s.flops / s.flops_needed:.2f}x the {s.flops_needed / 1e9:,.1f} needed)" if s.flops_needed else ""
            lines.append(f"    cost {s.flops / 1e9:,.1f} GFLOP{needed}{accessed}{bound}{extra}")
        if s.roofline_ms is not None:
            unit = "token" if s.step == "decode" else "chunk"
            lines.append(f"    roofline {s.roofline_ms:,.2f} ms per {unit} step -> {s.tokens_per_s:,.0f} tokens/s")
        if s.collectives is not None:
            coll = ", ".join(f"{c.kind} x{c.count} ({c.bytes / 2**20:,.1f} MiB)" for c in s.collectives) or "none"
            lines.append(f"    collectives per step: {coll}")
    if p.max_context:
        lines += format_contexts(p.max_context, p.window, "largest context per chip by the compiled decode step "
                                 "(its temporaries as compiled):")
    return "\n".join(lines)
