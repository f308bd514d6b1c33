"""What is trained and one optimizer step: LoRA adapters and/or whole parameter groups, the rest frozen; optax
AdamW with warmup + cosine decay and gradient clipping; gradient accumulation over micro-batches; remat per layer.

    spec = TrainSpec(lora_rank=16, lora_targets=("attn",))
    trainable = init_trainable(params, spec, seed=0)          # {path: {"a", "b"}} and/or {path: array}
    opt = optimizer(spec)
    state = TrainState(jnp.int32(0), trainable, opt.init(trainable))
    step = make_train_step(cfg, params, spec, mesh=mesh)       # jitted: (state, batch) -> (state, metrics)

Parameters are the stacked tree (`model.params` with `layer_loop="scan"`), named by path
("layers_moe.attn.q_a_proj"). A batch is {"input_ids", "labels", "attention_mask"} [A, B, T] (A micro-batches);
the step's loss is the mean over all counted tokens of the A micro-batches, as one batch of A x B rows would give.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import Mistral4Config
from ..model.loss import causal_lm_loss
from ..sharding import DEFAULT_RULES, ShardingRules, batch_spec, mesh_platform, path_name
from ..weights.lora import CORE_NDIM, LoraWeight, factor_shapes, factor_specs, init_factors
from ..weights.quant import is_quant

Array = jax.Array

LORA_ALIASES = {
    "attn": ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj", "k_b_proj", "v_b_proj", "o_proj"),
    "experts": ("experts_gate", "experts_up", "experts_down"),
    "shared_expert": ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
"""Names a LoRA target may use besides a weight's own name: groups of weights."""


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What is trained and how. lora_targets: weight names or `LORA_ALIASES` ("attn", "experts",
    "shared_expert", "mlp"), each getting a rank-`lora_rank` adapter (0 = no LoRA); train_params: glob
    patterns over parameter paths or path components ("*norm*", "router", "lm_head") trained in full.
    Schedule: linear warmup over `warmup_steps` to `lr`, cosine decay to `lr * end_lr_ratio` at `steps`."""

    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("attn",)
    train_params: tuple[str, ...] = ()
    lr: float = 1e-4
    warmup_steps: int = 10
    steps: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    remat: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@struct.dataclass
class TrainState:
    step: Array
    trainable: Any
    opt_state: Any


def key(keys: tuple) -> str:
    """"layers_moe.attn.q_a_proj": a parameter's name in the trained tree (dots: Orbax keeps them as one key)."""
    return path_name(keys).replace("/", ".")


def named_leaves(params: Any) -> dict[str, Any]:
    """{name: leaf} of the parameter tree (a `QuantArray` is one leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quant)[0]
    return {key(k): v for k, v in flat}


def lora_paths(params: Any, targets: tuple[str, ...]) -> list[str]:
    """Paths of the weights `targets` name; ValueError for a target that names none."""
    names = named_leaves(params)
    out: list[str] = []
    for target in targets:
        wanted = LORA_ALIASES.get(target, (target,))
        hits = [p for p in names if p.rsplit(".", 1)[-1] in CORE_NDIM and any(p.endswith("." + w) for w in wanted)]
        if not hits:
            known = sorted({p.rsplit(".", 1)[-1] for p in names if p.rsplit(".", 1)[-1] in CORE_NDIM} | set(LORA_ALIASES))
            raise ValueError(f"LoRA target {target!r} matches no weight of this model (known: {', '.join(known)})")
        out += [p for p in hits if p not in out]
    return out


def full_paths(params: Any, patterns: tuple[str, ...]) -> list[str]:
    """Paths matching the glob `patterns` (against the path or any of its components); ValueError for a pattern
    that matches nothing or a quantised weight (train those as LoRA)."""
    names = named_leaves(params)
    out: list[str] = []
    for pattern in patterns:
        hits = [p for p in names if fnmatch.fnmatch(p, pattern) or any(fnmatch.fnmatch(c, pattern) for c in p.split("."))]
        if not hits:
            raise ValueError(f"train_params pattern {pattern!r} matches no parameter (e.g. {', '.join(list(names)[:6])})")
        quant = [p for p in hits if is_quant(names[p])]
        if quant:
            raise ValueError(f"train_params pattern {pattern!r} matches FP8 weight {quant[0]}: fine-tune it with LoRA")
        out += [p for p in hits if p not in out]
    return out


def trainable_paths(params: Any, spec: TrainSpec) -> tuple[list[str], list[str]]:
    """(LoRA target names, fully trained names); ValueError when there is nothing to train."""
    full = full_paths(params, spec.train_params)
    lora = [p for p in lora_paths(params, spec.lora_targets) if p not in full] if spec.lora_rank > 0 else []
    if not lora and not full:
        raise ValueError("nothing to train: give LoRA targets with a rank > 0, or train_params")
    return lora, full


def init_trainable(params: Any, spec: TrainSpec, seed: int = 0) -> dict[str, Any]:
    """The trained arrays: {name: {"a", "b"}} per LoRA target (float32, placed like the base weight on the
    dimensions they keep) and {name: float32 copy} per fully trained parameter."""
    names = named_leaves(params)
    lora, full = trainable_paths(params, spec)
    out: dict[str, Any] = {}
    keys = jax.random.split(jax.random.key(seed), max(len(lora), 1))
    for key, path in zip(keys, lora):
        w = names[path]
        a, b = init_factors(key, path.rsplit(".", 1)[-1], tuple(w.shape), spec.lora_rank)
        sa, sb = _factor_shardings(path, w)
        out[path] = {"a": a if sa is None else jax.device_put(a, sa), "b": b if sb is None else jax.device_put(b, sb)}
    for path in full:
        out[path] = names[path].astype(jnp.float32)
    return out


def abstract_trainable(params: Any, spec: TrainSpec) -> dict[str, Any]:
    """`init_trainable`'s shapes, dtypes and shardings, of abstract (ShapeDtypeStruct) parameters: for compiling."""
    names = named_leaves(params)
    lora, full = trainable_paths(params, spec)
    out: dict[str, Any] = {}
    for path in lora:
        w = names[path]
        shapes = factor_shapes(path.rsplit(".", 1)[-1], tuple(w.shape), spec.lora_rank)
        out[path] = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
                     for k, shape, sh in zip("ab", shapes, _factor_shardings(path, w))}
    for path in full:
        w = names[path]
        out[path] = jax.ShapeDtypeStruct(w.shape, jnp.float32, sharding=getattr(w, "sharding", None))
    return out


def _factor_shardings(path: str, w: Any) -> tuple[Any, Any]:
    """NamedShardings of a LoRA target's a and b from its weight's (None, None without one)."""
    sharding = getattr(w.values if is_quant(w) else w, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (len(w.shape) - len(sharding.spec))
    sa, sb = factor_specs(path.rsplit(".", 1)[-1], spec)
    return NamedSharding(sharding.mesh, P(*sa)), NamedSharding(sharding.mesh, P(*sb))


def combine(params: Any, trainable: dict[str, Any], spec: TrainSpec) -> Any:
    """The parameter tree the model reads: LoRA targets as `LoraWeight`s, fully trained leaves replaced (cast to
    the stored dtype), the rest as stored."""
    scale = spec.lora_alpha / max(spec.lora_rank, 1)

    def pick(keys: tuple, w: Any) -> Any:
        t = trainable.get(key(keys))
        if t is None:
            return w
        if isinstance(t, dict):
            return LoraWeight(w, t["a"], t["b"], scale)
        return t.astype(w.dtype)

    return jax.tree_util.tree_map_with_path(pick, params, is_leaf=is_quant)


def schedule(spec: TrainSpec) -> optax.Schedule:
    """The learning rate by step: linear warmup, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(0.0, spec.lr, max(spec.warmup_steps, 0), max(spec.steps, 1),
                                              end_value=spec.lr * spec.end_lr_ratio)


def optimizer(spec: TrainSpec) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on `schedule`."""
    return optax.chain(optax.clip_by_global_norm(spec.clip_norm),
                       optax.adamw(schedule(spec), b1=spec.b1, b2=spec.b2, weight_decay=spec.weight_decay))


def make_train_step(cfg: Mistral4Config, params: Any, spec: TrainSpec, opt: optax.GradientTransformation | None = None,
                    mesh: Any = None, dtype: Any = jnp.float32,
                    rules: ShardingRules = DEFAULT_RULES) -> Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """`train_step`'s jitted step on these parameters: (state, batch) -> (state, metrics)."""
    jitted = train_step(cfg, spec, opt, mesh, dtype, rules)
    return lambda state, batch: jitted(params, state, batch)


def train_step(cfg: Mistral4Config, spec: TrainSpec, opt: optax.GradientTransformation | None = None, mesh: Any = None,
               dtype: Any = jnp.float32, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """The jitted step (params, state, batch) -> (state, metrics), state donated. `opt` None = `optimizer(spec)`;
    then the jitted function is shared by every call with the same settings (a resumed run in the same process
    does not compile again)."""
    if opt is None:
        return _shared_train_step(cfg, spec, mesh, dtype, rules)
    return _train_step(cfg, spec, opt, mesh, dtype, rules)


@functools.lru_cache(maxsize=8)
def _shared_train_step(cfg: Mistral4Config, spec: TrainSpec, mesh: Any, dtype: Any, rules: ShardingRules) -> Any:
    return _train_step(cfg, spec, optimizer(spec), mesh, dtype, rules)


def _train_step(cfg: Mistral4Config, spec: TrainSpec, opt: optax.GradientTransformation, mesh: Any, dtype: Any,
                rules: ShardingRules) -> Any:
    """Gradients of the mean loss over every counted token of the batch's
    micro-batches (accumulated under `lax.scan`), then one optimizer update. Metrics: loss, tokens, grad_norm.
    On a mesh the rows of each micro-batch are split over the rules' "batch" axis (data parallel; not on a CPU
    mesh, see below)."""

    if mesh is not None and mesh_platform(mesh) == "cpu" and rules.get("batch"):
        # XLA:CPU deadlocks in the backward pass when the experts' shard_map splits tokens over "data" (its
        # collectives are not ordered alike on every simulated device); on CPU the batch stays replicated
        rules = rules.replace(batch=None)

    def loss_sum(trainable: Any, params: Any, ids: Array, labels: Array, mask: Array) -> tuple[Array, Array]:
        if mesh is not None:
            place = NamedSharding(mesh, batch_spec(mesh, ids.shape[0], 2, rules))
            ids, labels, mask = (jax.lax.with_sharding_constraint(x, place) for x in (ids, labels, mask))
        loss, tokens = causal_lm_loss(combine(params, trainable, spec), cfg, ids, labels, mask, dtype=dtype,
                                      mesh=mesh, rules=rules, remat=spec.remat)
        return loss * tokens, tokens

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(params: Any, state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        def micro(carry, mb):
            total, tokens, grads = carry
            (s, n), g = grad_fn(state.trainable, params, mb["input_ids"], mb["labels"], mb["attention_mask"])
            return (total + s, tokens + n, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (total, tokens, grads), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.int32(0), zeros), batch)
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = opt.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": total / denom, "tokens": tokens, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return jax.jit(step, donate_argnums=(1,))


def merged_params(params: Any, trainable: dict[str, Any], spec: TrainSpec) -> Any:
    """The parameters with the adapters folded in and the trained leaves in place (for inference and export)."""
    from ..weights.lora import is_lora, merge

    return jax.tree_util.tree_map(merge, combine(params, trainable, spec), is_leaf=is_lora)
