"""Compile the real model's decode step and a prefill chunk for a TPU topology on this CPU; report costs.

    python benchmarks/moe_aot.py [--config mistral-small-4-119b] [--topology v5e:4x4] [--mesh expert=8,tensor=2]
        [--dtype float8_e4m3fn] [--compute bfloat16] [--tokens 4096] [--cache 4096] [--batch 1]
        [--moe-backend auto] [--phases decode,prefill] [--no-time]

Needs `pip install "jax[tpu]"` (libtpu compiles for a TPU topology without the hardware; nothing is
allocated: parameters and cache are `jax.ShapeDtypeStruct`s with their shardings).

Per phase (decode: `--batch` tokens attending a `--cache`-slot latent cache; prefill: one chunk of
`--tokens` tokens writing a cache of as many slots, last logits only):

- `compile_s`: seconds to lower + compile the whole model (all layers, `layer_loop="scan"`, as
  accelerators run it), and its `memory_analysis()` per chip (`args_gib`, `temp_gib`).
- Costs per chip from `cost_analysis()` (`flops`, `bytes`) and the collectives in `as_text()` for
  the whole model. XLA counts a scan/while body once, so they come from two compiles with *unrolled*
  layers, 1 and 2 layers: per layer = (2 layers) - (1 layer); whole model = (1 layer) + (layers - 1)
  x per layer.
- What the chip must do, from the layout (`sharding.RULES`, the mesh), for comparison:
  decode `must_read_bytes` = every parameter byte on the chip except the routed experts, one embedding
  row, the cache slice, and the chosen experts it holds: at worst min(batch x top-k, experts per chip)
  experts per layer (`must_read_bytes`; all of a token's choices may land on one chip, and a program
  with static shapes must be ready for that), on average batch x top-k / expert-shards
  (`must_read_bytes_mean`). prefill `analytic_flops` = 2 x tokens x (every matmul weight on the
  chip, once per token) + the routed experts' share (tokens x top-k / expert-shards copies x
  3 D F / tensor-shards) + causal attention (scores and values over (T+1)/2 keys on average, heads
  over `tensor`) + the lm_head on the last token; `analytic_flops_square` counts the attention over
  all T keys, as a masked dense attention computes it.

Prints one JSON line on stdout (progress on stderr). Note the machine's load (`uptime`) with it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

for _k, _v in {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-16", "TPU_WORKER_HOSTNAMES": "localhost"}.items():
    os.environ.setdefault(_k, _v)

GiB = 1024**3
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of each collective's result in an HLO module's text, summed per kind (async starts counted
    once, by the largest array of their result tuple)."""
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        sizes = [_BYTES.get(dt, 4) * (eval("*".join(dims.split(",")) or "1") if dims else 1)
                 for dt, dims in _SHAPE.findall(m.group(1))]
        out[m.group(2)] = out.get(m.group(2), 0) + max(sizes, default=0)
    return out


def topology_mesh(topology: str, mesh_spec: str):
    from jax.experimental import topologies

    from mistral4_jax.sharding import make_mesh

    chips = 1
    for n in re.findall(r"\d+", topology.split(":")[1]):
        chips *= int(n)
    bounds = (2, 2, 1) if chips >= 4 else (1, 1, 1)
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1)
    return make_mesh(mesh_spec, devices=topo.devices)


def abstract_inputs(cfg, mesh, dtype, cache_dtype, batch: int, tokens: int, cache_len: int, unroll: bool):
    """Sharded ShapeDtypeStructs: params (stacked, or per-layer lists if `unroll`), ids, positions, cache."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mistral4_jax.model import abstract_params, cache_shardings, init_cache, param_shardings
    from mistral4_jax.sharding import batch_spec

    def attach(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    params = jax.tree_util.tree_map(attach, abstract_params(cfg, dtype), param_shardings(cfg, mesh, dtype))
    if unroll:
        for name in ("layers_dense", "layers_moe"):
            if name in params:
                n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
                one = jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=NamedSharding(mesh, P(*a.sharding.spec[1:]))),
                    params[name])
                params[name] = [one] * n
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len, cache_dtype))
    cache = jax.tree_util.tree_map(attach, cache, cache_shardings(mesh, cache))
    tok = NamedSharding(mesh, batch_spec(mesh, batch, 2))
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=tok)
    return params, ids, cache


def compile_phase(cfg, mesh, args, phase: str, layers: int, unroll: bool):
    """Lower + compile one phase; returns (compiled, seconds)."""
    import jax
    import jax.numpy as jnp

    from mistral4_jax.model import forward

    cfg = cfg.replace(num_hidden_layers=layers)
    dtype, compute = jnp.dtype(args.dtype), jnp.dtype(args.compute)
    decode = phase == "decode"
    tokens = 1 if decode else args.tokens
    cache_len = args.cache if decode else args.tokens
    params, ids, cache = abstract_inputs(cfg, mesh, dtype, compute, args.batch, tokens, cache_len, unroll)
    extra = {} if args.moe_backend is None else {"moe_backend": args.moe_backend}

    def step(params, ids, cache):
        positions = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32) + (cache_len - 1 if decode else 0), ids.shape)
        index = cache_len - 1 if decode else 0
        logits, _, cache = forward(params, cfg, ids, positions, jnp.ones(ids.shape, bool), cache=cache, index=index,
                                   decode=decode, last_only=True, dtype=compute, mesh=mesh, **extra)
        return logits, cache

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(2,)).lower(params, ids, cache).compile()
    return compiled, time.perf_counter() - t0


def costs(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out = {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}
    for kind, n in collective_bytes(compiled.as_text()).items():
        out["coll_" + kind] = float(n)
    return out


def chip_share(cfg, mesh, dtype) -> tuple[float, float, float]:
    """(bytes of the parameters on one chip without the routed experts and embedding,
    bytes of one routed expert's slice on one chip (gate + up + down, with its scales),
    matmul weights (count of numbers) on one chip used once per token, without experts/embed/lm_head)."""
    import jax
    import numpy as np

    from mistral4_jax.model import abstract_params, param_shardings

    params, shard = abstract_params(cfg, dtype), param_shardings(cfg, mesh, dtype)
    dense_bytes = expert_bytes = weights = 0.0
    for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(shard)):
        key = jax.tree_util.keystr(path)
        div = np.prod([mesh.shape[ax] for ax in s.spec if ax is not None]) if s.spec else 1
        per_chip = a.size * a.dtype.itemsize / div
        if "experts_" in key:  # [layers, E, ...] over (None, expert, ...): one expert of one layer
            expert_bytes += per_chip / (a.shape[0] * a.shape[1] / mesh.shape["expert"])
        elif key.startswith("['embed']"):
            continue
        else:
            dense_bytes += per_chip
            if a.ndim >= 3 and not key.endswith(".scale"):  # stacked matrices [layers, ...], not QuantArray scales
                weights += a.size / div
    return dense_bytes, expert_bytes, weights


def targets(cfg, mesh, args, phase: str) -> dict[str, float]:
    """What one chip must read (decode) / compute (prefill), from the layout."""
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    e_local = cfg.n_routed_experts // ep
    k, n_layers = cfg.num_experts_per_tok, cfg.num_moe_layers
    dense_bytes, expert_bytes, weights = chip_share(cfg, mesh, dtype)
    d = cfg.hidden_size
    if phase == "decode":
        cache = n_layers * args.batch * args.cache * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(args.compute).itemsize
        rest = dense_bytes + args.batch * d * 2 + cache
        return {"must_read_bytes": rest + n_layers * min(args.batch * k, e_local) * expert_bytes,
                "must_read_bytes_mean": rest + n_layers * args.batch * k / ep * expert_bytes}
    t = args.tokens * args.batch
    f = cfg.moe_intermediate_size
    routed = 2.0 * t * k / ep * 3 * d * f / tp * n_layers
    n_heads = cfg.num_attention_heads / tp
    per_key = n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    causal = 2.0 * t * per_key * (args.tokens + 1) / 2 * cfg.num_hidden_layers
    square = 2.0 * t * per_key * args.tokens * cfg.num_hidden_layers
    head = 2.0 * args.batch * d * cfg.vocab_size / tp
    base = 2.0 * t * weights + routed + head
    return {"analytic_flops": base + causal, "analytic_flops_square": base + square}


def run(args: argparse.Namespace) -> dict:
    import jax

    from mistral4_jax import Mistral4Config

    cfg = Mistral4Config.from_json(C.config_path(args.config))
    mesh = topology_mesh(args.topology, args.mesh)
    out: dict = {"config": args.config, "topology": args.topology, "mesh": args.mesh, "dtype": args.dtype,
                 "compute": args.compute, "batch": args.batch, "tokens": args.tokens, "cache": args.cache,
                 "moe_backend": args.moe_backend, "jax": jax.__version__, "load_before": os.getloadavg()[0]}
    for phase in args.phases.split(","):
        rec: dict = {}
        if not args.no_time:
            C.log(f"{phase}: compiling {cfg.num_hidden_layers} layers (scan)")
            compiled, secs = compile_phase(cfg, mesh, args, phase, cfg.num_hidden_layers, unroll=False)
            mem = compiled.memory_analysis()
            rec.update(compile_s=round(secs, 1), args_gib=round(mem.argument_size_in_bytes / GiB, 3),
                       temp_gib=round(mem.temp_size_in_bytes / GiB, 3))
        one, two = (costs(compile_phase(cfg, mesh, args, phase, n, unroll=True)[0]) for n in (1, 2))
        n = cfg.num_hidden_layers
        for key in sorted(set(one) | set(two)):
            per_layer = two.get(key, 0.0) - one.get(key, 0.0)
            rec[key + "_per_layer"] = per_layer
            rec[key] = one.get(key, 0.0) + (n - 1) * per_layer
        rec.update(targets(cfg, mesh, args, phase))
        if phase == "decode":
            rec["bytes_ratio"] = round(rec["bytes"] / rec["must_read_bytes"], 3)
            rec["bytes_ratio_mean"] = round(rec["bytes"] / rec["must_read_bytes_mean"], 3)
        else:
            rec["flops_ratio"] = round(rec["flops"] / rec["analytic_flops"], 3)
            rec["flops_ratio_square"] = round(rec["flops"] / rec["analytic_flops_square"], 3)
        out[phase] = rec
        C.log(phase, rec)
    out["load_after"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mistral-small-4-119b")
    ap.add_argument("--topology", default="v5e:4x4")
    ap.add_argument("--mesh", default="expert=8,tensor=2")
    ap.add_argument("--dtype", default="float8_e4m3fn")
    ap.add_argument("--compute", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096, help="prefill chunk length")
    ap.add_argument("--cache", type=int, default=4096, help="decode cache length")
    ap.add_argument("--moe-backend", default=None, help="auto, loop or ragged (default: the model's default)")
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--no-time", action="store_true", help="skip the full-depth compile (costs only)")
    args = ap.parse_args()
    with C.quiet_stdout():
        record = run(args)
    C.emit(record)


if __name__ == "__main__":
    main()
