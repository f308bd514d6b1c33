"""Training memory per device: an estimate from shapes (`train_memory`) and the compiler's figures for a TPU or
GPU target (`compile_train_step`: one train step compiled with abstract weights, nothing allocated).

    mistral4-jax plan --config mistral-small-4-119b --train --mesh expert=4 --dtype float8_e4m3fn --batch 1 --seq-len 4096
    mistral4-jax plan --config mistral-small-4-119b --train --compile v5p-8 --dtype float8_e4m3fn

Per device: the frozen weights (stored dtype), the trained arrays (float32), their gradients and the gradient
accumulator (float32 each), AdamW's two moments (float32 each), and activations: with remat each layer's input
[B, T, D] is kept for the backward pass plus one layer's recomputed activations and the float32 logits and their
gradient [B, T, X]. The estimate counts the big terms; the compile is the measurement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import model as M
from ..config import Mistral4Config
from ..model.layers import ATTN_BLOCK
from ..sharding import DEFAULT_RULES, ShardingRules, batch_spec, make_mesh, parse_mesh
from ..train.step import TrainSpec, TrainState, abstract_trainable, key, named_leaves, optimizer, train_step, trainable_paths
from ..weights.lora import factor_shapes, factor_specs
from ..weights.quant import QuantArray, is_quant
from .compile import _abstract
from .memory import _weight_bytes, format_bytes
from .targets import default_mesh, parse_target, target_devices


@dataclasses.dataclass
class TrainMemory:
    """Bytes per device of one training step (see the module docstring); `compiled`: the compiler's figures."""

    mesh: dict[str, int]
    batch: int
    seq_len: int
    weights: int
    trainable: int
    grads: int
    optimizer: int
    activations: int
    trainable_params: int
    total: int = 0
    compiled: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _per_device(shape: tuple[int, ...], spec: Any, mesh: dict[str, int], itemsize: int) -> int:
    split = math.prod(mesh[a] for a in spec if a)
    return -(-math.prod(shape) * itemsize // split)


def _trainable_bytes(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any, spec: TrainSpec,
                     rules: ShardingRules) -> tuple[int, int]:
    """(trained parameters in all, float32 bytes of them on one device)."""
    abstract = M.abstract_params(cfg, dtype)
    flat = jax.tree_util.tree_flatten_with_path(M.param_axes(cfg, dtype), is_leaf=lambda x: isinstance(x, (tuple, QuantArray)))[0]
    axes = {key(k): jax.tree_util.tree_map(lambda a: tuple(rules.spec(a)), a, is_leaf=lambda x: isinstance(x, tuple))
            for k, a in flat}  # name -> mesh axes per dimension (a QuantArray of them for a quantised weight)
    leaves = named_leaves(abstract)
    lora, full = trainable_paths(abstract, spec)
    count, nbytes = 0, 0
    for name in lora:
        short = name.rsplit(".", 1)[-1]
        spec_of = axes[name].values if is_quant(axes[name]) else axes[name]
        for shape, split in zip(factor_shapes(short, tuple(leaves[name].shape), spec.lora_rank), factor_specs(short, spec_of)):
            count, nbytes = count + math.prod(shape), nbytes + _per_device(shape, split, mesh, 4)
    for name in full:
        count, nbytes = count + math.prod(leaves[name].shape), nbytes + _per_device(leaves[name].shape, axes[name], mesh, 4)
    return count, nbytes


def activation_bytes(cfg: Mistral4Config, mesh: dict[str, int], batch: int, seq_len: int, compute_dtype: Any,
                     remat: bool = True, rules: ShardingRules = DEFAULT_RULES) -> int:
    """Activations of one step on one device (estimate): kept layer inputs, one layer's working set (attention
    blocks, latent expansions, the routed copies' expert hidden units), logits and their gradient."""
    c = np.dtype(compute_dtype).itemsize
    data = mesh.get(rules.get("batch") or "", 1)
    b = batch // data if batch % data == 0 else batch
    tens = mesh.get(rules.get("heads") or "", 1)
    n = cfg.num_attention_heads // tens
    h, v, d = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.hidden_size
    f = cfg.moe_intermediate_size // mesh.get(rules.get("expert_mlp") or "", 1)
    tokens = b * seq_len
    attention = b * n * seq_len * min(seq_len, ATTN_BLOCK) * 4 * 2 + tokens * n * (2 * h + v) * c
    experts = tokens * cfg.num_experts_per_tok * (d + 3 * f) * c
    layer = attention + experts + tokens * d * c * 8  # norms, residuals, projections
    kept = cfg.num_hidden_layers * tokens * d * c if remat else cfg.num_hidden_layers * layer
    vocab = cfg.vocab_size // mesh.get(rules.get("vocab") or "", 1)
    return kept + layer + 2 * tokens * vocab * 4


def train_memory(cfg: Mistral4Config, mesh: dict[str, int], dtype: Any, spec: TrainSpec, batch: int, seq_len: int,
                 compute_dtype: Any = jnp.bfloat16, rules: ShardingRules = DEFAULT_RULES) -> TrainMemory:
    """The estimate of one step's memory per device (see the module docstring)."""
    _, weights = _weight_bytes(cfg, mesh, dtype, rules)
    count, trained = _trainable_bytes(cfg, mesh, dtype, spec, rules)
    acts = activation_bytes(cfg, mesh, batch, seq_len, compute_dtype, spec.remat, rules)
    mem = TrainMemory(dict(mesh), batch, seq_len, weights, trained, 2 * trained, 2 * trained, acts, count)
    mem.total = mem.weights + mem.trainable + mem.grads + mem.optimizer + mem.activations
    return mem


def compile_train_step(cfg: Mistral4Config, target: str, mesh: str | dict[str, int] | None, dtype: Any, spec: TrainSpec,
                       batch: int, seq_len: int, accum: int = 1, compute_dtype: Any = jnp.bfloat16,
                       rules: ShardingRules = DEFAULT_RULES) -> dict[str, Any]:
    """Compile one train step for `target` (e.g. "v5p-8") with abstract weights, trained arrays, optimizer state
    and batch; the compiler's bytes per chip, whether it fits (TPU: the compiler refuses what does not) and
    the compile seconds."""
    t = parse_target(target)
    sizes = parse_mesh(default_mesh(t, cfg) if mesh is None else mesh, t.chips)
    device_mesh = make_mesh(sizes, devices=target_devices(t))
    params = _abstract(M.abstract_params(cfg, dtype), M.param_shardings(cfg, device_mesh, dtype, rules))
    trainable = abstract_trainable(params, spec)
    opt = optimizer(spec)
    replicated = NamedSharding(device_mesh, P())
    import optax

    opt_state = optax.tree_map_params(
        opt, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), jax.eval_shape(opt.init, trainable),
        trainable, transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), trainable, opt_state)
    rows = NamedSharding(device_mesh, P(None, *batch_spec(device_mesh, batch, 2, rules)))
    tokens = {k: jax.ShapeDtypeStruct((accum, batch, seq_len), jnp.int32, sharding=rows)
              for k in ("input_ids", "labels", "attention_mask")}
    fn = train_step(cfg, spec, opt, device_mesh, compute_dtype, rules)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"target": t.name, "mesh": sizes, "hbm_per_chip": t.hbm_bytes, "batch": batch,
                           "seq_len": seq_len, "accum": accum}
    try:
        compiled = fn.lower(params, state, tokens).compile()
    except Exception as e:  # XLA's error type differs between jax versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        out.update(fits=False, error=" ".join(str(e).split())[:400], compile_s=round(time.perf_counter() - t0, 1))
        return out
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    out.update(fits=total <= t.hbm_bytes, compile_s=round(time.perf_counter() - t0, 1),
               argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes), total_bytes=int(total))
    return out


def format_train_memory(p: TrainMemory) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"training step on mesh {mesh}: batch {p.batch} x {p.seq_len} tokens, {p.trainable_params:,} trained parameters",
             f"  frozen weights   {format_bytes(p.weights):>12} per device",
             f"  trained (fp32)   {format_bytes(p.trainable):>12}",
             f"  grads + accum    {format_bytes(p.grads):>12}",
             f"  AdamW moments    {format_bytes(p.optimizer):>12}",
             f"  activations      {format_bytes(p.activations):>12}  (estimate)",
             f"  total            {format_bytes(p.total):>12}"]
    if p.compiled:
        c = p.compiled
        if c.get("fits") is False and "error" in c:
            lines.append(f"compiled for {c['target']}: does not fit ({c['error'][:200]})")
        else:
            lines.append(f"compiled for {c['target']} ({c['compile_s']} s): {format_bytes(c['total_bytes'])} per chip "
                         f"of {format_bytes(c['hbm_per_chip'])} (arguments {format_bytes(c['argument_bytes'])}, "
                         f"temporaries {format_bytes(c['temp_bytes'])}){'' if c['fits'] else ': does not fit'}")
    return "\n".join(lines)


__all__ = ["TrainMemory", "activation_bytes", "compile_train_step", "format_train_memory", "train_memory"]
