"""GPU benchmark: the real Mistral Small 4 dimensions cut to the layers one GPU holds, ours vs transformers.

    python benchmarks/gpu.py             # GPU mode when jax sees a GPU, else the smoke run below
    python benchmarks/gpu.py --gpu       # GPU mode or a one-line error
    python benchmarks/gpu.py --smoke     # tiny config in float32 on whatever is there (< 2 min on a CPU)
    python benchmarks/gpu.py --layers 4 --new 32 --prefill 1024     # overrides (either mode)

On a lent GPU machine whose image lacks some of this package's dependencies and has no network (the H200
image of 2026-11): download their wheels here, carry `.wheels`, install them there without an index:

    pip download -d .wheels --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
        mistral-common jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core \
        annotated-types typing-inspection pydantic-extra-types pycountry                       # ~18 MB
    pip install -q --no-index --no-deps .wheels/*.whl && PYTHONPATH=. python3 benchmarks/gpu.py --gpu

GPU mode: `configs/mistral-small-4-119b.json` (vocabulary 131,072, hidden 4,096, 128 experts top-4), bf16
weights and compute, `num_hidden_layers` cut so that two copies of the weights (transformers' and ours: both
exist while ours is copied out of transformers') fit in the bytes jax may use on the device
(`memory_stats()["bytes_limit"]`, else the H200's figure) less 10%, 4 GiB for activations, caches and code,
and two layers for the copy's temporaries (bytes from `plan.memory.memory_plan`). Order: transformers builds
the random model on the GPU and is timed first; its tensors are then handed to jax on the device (DLPack) and
laid out by the checkpoint reader's own mapping (`weights.hf.read_layer`), layer by layer into our stacked
layers; transformers is freed; ours is timed. jax is told not to preallocate, so both share the GPU.

Decode, at batch 1, 8 and 64, 128-token random prompts, exactly `--new` greedy tokens (definitions as in
decode.py): tok/s = batch x new / wall time of a whole call (prefill included), ours through the public
`generator.stream` (jitted prefill + on-device decode loop), transformers through `generate`; step ms = ours'
decode part / (new - 1), transformers' (generate of new - generate of 1) / (new - 1). Roofline per step =
`plan.memory.decode_reads` bytes (attention, router, shared expert, norms, lm_head, the batch's embedding rows,
the routed experts the batch picks: 4 per layer at batch 1, 128 (1 - (1 - 4/128)^B) expected for uniform
routing, worst min(128, 4B); and the latent cache) / HBM bandwidth (`plan.targets.GPU_SPECS` for the device,
else the H200's 4.8 TB/s); frac = roofline / measured step. Prefill: batch 1 x `--prefill` tokens, a forward
returning the last position's logits (as forward.py), tok/s and the fraction of peak bf16 flop/s.

Smoke mode: `configs/tiny.json`, 2 layers, float32, batches 1 and 4, 16-token prompts, 8 new tokens, 64-token
prefill, same code; bandwidth and peak are then measured (decode.read_rate_gbs, the float32 matmul rate).
`h200_cut_layers` (either mode) is GPU mode's cut for an H200 (its 141 GiB x the 0.9 given to jax).

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # transformers shares the GPU
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import decode as D  # noqa: E402
from forward import prefill_flops_per_token  # noqa: E402

GiB = 1024**3
MODES = {
    "gpu": dict(config="mistral-small-4-119b", layers=None, dtype="bfloat16", batches=(1, 8, 64), prompt=128,
                new=64, prefill=2048, reps=3),
    "smoke": dict(config="tiny", layers=2, dtype="float32", batches=(1, 4), prompt=16, new=8, prefill=64, reps=1),
}


def choose_mode(args: argparse.Namespace) -> str:
    """"gpu" when jax sees a GPU (and torch CUDA), else "smoke"; exits with one line if --gpu cannot be had."""
    import jax
    import torch

    backend = jax.default_backend()
    if args.smoke:
        return "smoke"
    if backend != "gpu":
        if args.gpu:
            sys.exit(f"benchmarks/gpu.py: --gpu, but jax sees no GPU (backend {backend!r}); use --smoke on this machine")
        C.log(f"jax backend {backend!r}, no GPU: smoke run")
        return "smoke"
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/gpu.py: jax sees a GPU but torch {torch.__version__} has no CUDA; install a CUDA torch")
    return "gpu"


def cut_layers(cfg, dtype, limit: int) -> int:
    """Layers whose weights fit twice in `limit` bytes with the reserve of the module docstring."""
    from mistral4_jax.plan.memory import memory_plan

    one, two = (memory_plan(cfg.replace(num_hidden_layers=n), {}, dtype).weight_bytes_total for n in (1, 2))
    layer, rest = two - one, 2 * one - two  # one layer; embedding + lm_head + final norm
    free = limit * 0.9 - 4 * GiB - 2 * rest - 2 * layer
    return max(1, min(cfg.num_hidden_layers, int(free // (2 * layer))))


def to_ours(hf, cfg, dtype):
    """Our parameter tree holding transformers' weights, built on the device (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from mistral4_jax.model import abstract_params
    from mistral4_jax.weights.hf import HFReader, check_unexpected, layer_groups, read_globals, read_layer

    class TensorDict(dict):  # the `weights.safetensors.TensorIndex` interface over torch tensors
        names, get = dict.keys, dict.__getitem__

        def shape(self, name):
            return tuple(self[name].shape)

        def dtype(self, name):
            return jnp.dtype(str(self[name].dtype).removeprefix("torch."))

    class DeviceReader(HFReader):  # tensors stay where they are: a jax view (DLPack), not a float32 numpy copy
        def get(self, name, shape):
            self.check(name, shape)
            return jax.dlpack.from_dlpack(self._raw(name).detach())

    r = DeviceReader(TensorDict(hf.state_dict()), "transformers' state dict")
    params = jax.tree.map(jnp.copy, read_globals(r, cfg))  # copies: nothing may alias torch's memory
    put = jax.jit(lambda stack, layer, j: jax.tree.map(lambda s, x: s.at[j].set(x.astype(s.dtype)), stack, layer),
                  donate_argnums=0)
    abstract = abstract_params(cfg, dtype)
    for group, idx in layer_groups(cfg):
        stack = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract[group])
        for j, i in enumerate(idx):
            stack = put(stack, read_layer(r, i, cfg), j)
        params[group] = stack
    check_unexpected(r, cfg)
    return jax.block_until_ready(params)


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import mistral4_jax
    from mistral4_jax.plan.memory import decode_reads
    from mistral4_jax.plan.targets import GPU_SPECS
    from mistral4_jax.serve.generate import Request

    mode = choose_mode(args)
    s = {**MODES[mode], **{k: v for k, v in vars(args).items() if k in MODES[mode] and v is not None}}
    dev = jax.devices()[0]
    tdev = "cuda" if mode == "gpu" or (jax.default_backend() == "gpu" and torch.cuda.is_available()) else "cpu"
    cfg = mistral4_jax.Mistral4Config.from_json(C.config_path(s["config"]))
    limit, limit_from = (dev.memory_stats() or {}).get("bytes_limit"), "memory_stats"
    if limit is None:
        limit, limit_from = GPU_SPECS["H200"]["device_memory_size"], "H200 figure"
    jdtype = getattr(jnp, s["dtype"])
    layers = s["layers"] or cut_layers(cfg, jdtype, limit)
    cfg = cfg.replace(num_hidden_layers=layers)
    spec = next((v for k, v in GPU_SPECS.items() if k in dev.device_kind), GPU_SPECS["H200"])
    if mode == "gpu":
        bandwidth, bw_from, peak = float(spec["memory_bandwidth"]), spec["name"], spec["peak_bf16"]
    else:
        bandwidth, bw_from, peak = D.read_rate_gbs() * 1e9, "measured", C.MatmulRate().sample(5).gflops() * 1e9
    real = mistral4_jax.Mistral4Config.from_json(C.config_path(MODES["gpu"]["config"]))
    h200_layers = cut_layers(real, jnp.bfloat16, 0.9 * GPU_SPECS["H200"]["device_memory_size"])  # GPU mode's cut
    C.log(f"{mode}: {s['config']} cut to {layers} layers, {s['dtype']}, jax on {dev.device_kind}, torch on {tdev}")
    never, reps, new = cfg.vocab_size - 1, s["reps"], s["new"]
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, cfg.vocab_size - 1, size=(b, s["prompt"])) for b in s["batches"]}
    long = rng.integers(3, cfg.vocab_size - 1, size=(1, s["prefill"]))
    t: dict = {}  # (side, what) -> seconds

    hf = C.hf_reference(cfg, s["dtype"], tdev)
    hf_impl = {k: getattr(hf.config, f"_{k}_implementation", None) for k in ("experts", "attn")}
    C.log(f"transformers built: {hf_impl}")
    for b, p in prompts.items():
        ids = torch.tensor(p, device=tdev)
        D.hf_generate(hf, ids, new, never)
        t["hf", b] = C.median(C.timeit(lambda: D.hf_generate(hf, ids, new, never), reps))
        t["hf1", b] = C.median(C.timeit(lambda: D.hf_generate(hf, ids, 1, never), reps))
        C.log(f"transformers b{b}: {b * new / t['hf', b]:.1f} tok/s")
    ids = torch.tensor(long, device=tdev)

    def hf_prefill():
        with torch.inference_mode():
            out = hf(input_ids=ids, logits_to_keep=1).logits[0, -1].float().cpu().numpy()
        return out

    hf_logits = hf_prefill()
    t["hf", "prefill"] = C.median(C.timeit(hf_prefill, reps))

    C.log("handing the weights to jax")
    params = to_ours(hf, cfg, jdtype)
    del hf, ids
    gc.collect()
    if tdev == "cuda":
        torch.cuda.empty_cache()
    ours = mistral4_jax.Mistral4(cfg, params, dtype=s["dtype"])
    ours.verbose = False
    steps: dict = {}
    for b, p in prompts.items():
        requests = [Request(row.tolist(), new) for row in p]
        D.time_ours(ours, requests)
        times = [D.time_ours(ours, requests) for _ in range(reps)]
        assert all(len(g.tokens) == new for g in times[-1][2])
        t["ours", b] = C.median([pre + dec for pre, dec, _ in times])
        steps[b] = C.median([dec for _, dec, _ in times]) / (new - 1)
        C.log(f"ours b{b}: {b * new / t['ours', b]:.1f} tok/s, {steps[b] * 1e3:.2f} ms/step")

    def ours_prefill():
        return np.asarray(ours.forward(long, last_only=True)[0][0, -1], np.float32)

    ours_logits = ours_prefill()
    t["ours", "prefill"] = C.median(C.timeit(ours_prefill, reps))

    record: dict = {"bench": "gpu", "mode": mode, "config": s["config"], "layers": layers, "dtype": s["dtype"],
                    "prompt_tokens": s["prompt"], "new_tokens": new, "prefill_tokens": s["prefill"],
                    "jax_device": dev.device_kind, "torch_device": tdev,
                    "device_bytes_limit_gib": limit / GiB, "bytes_limit_from": limit_from,
                    "bandwidth_gbs": bandwidth / 1e9, "bandwidth_from": bw_from,
                    "h200_cut_layers": h200_layers, "layer_loop": ours.layer_loop, "moe_backend": ours.moe_backend}
    for b in prompts:
        reads = decode_reads(cfg, {}, jdtype, batch=b, context=s["prompt"] + new)
        roof, worst = reads.expected / bandwidth, reads.worst / bandwidth
        hf_step = (t["hf", b] - t["hf1", b]) / (new - 1)
        record.update({
            f"ours_tok_s_b{b}": b * new / t["ours", b], f"hf_tok_s_b{b}": b * new / t["hf", b],
            f"ratio_b{b}": t["hf", b] / t["ours", b],
            f"ours_step_ms_b{b}": steps[b] * 1e3, f"hf_step_ms_b{b}": hf_step * 1e3,
            f"must_read_gb_b{b}": reads.expected / 1e9, f"experts_read_per_layer_b{b}": reads.experts_read_expected,
            f"roofline_step_ms_b{b}": roof * 1e3, f"roofline_step_ms_worst_b{b}": worst * 1e3,
            f"ours_frac_of_roofline_b{b}": roof / steps[b], f"hf_frac_of_roofline_b{b}": roof / hf_step,
        })
    flops = prefill_flops_per_token(cfg, s["prefill"]) * s["prefill"]
    record.update(
        ours_prefill_tok_s=s["prefill"] / t["ours", "prefill"],
        hf_prefill_tok_s=s["prefill"] / t["hf", "prefill"],
        prefill_ratio=t["hf", "prefill"] / t["ours", "prefill"],
        ours_prefill_frac_of_peak=flops / t["ours", "prefill"] / peak,
        hf_prefill_frac_of_peak=flops / t["hf", "prefill"] / peak,
        peak_tflops=peak / 1e12, peak_from=spec["name"] if mode == "gpu" else "measured float32 matmul",
        prefill_max_abs_logit_diff=float(np.max(np.abs(ours_logits - hf_logits))),
        weight_gib=sum(x.nbytes for x in jax.tree.leaves(params)) / GiB,
        hf_experts=hf_impl["experts"], hf_attention=hf_impl["attn"], reps=reps, machine=C.machine(), **C.versions(),
    )
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in record.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--gpu", action="store_true", help="GPU mode, or a one-line error without a GPU")
    which.add_argument("--smoke", action="store_true", help="tiny config, float32, small batches (CPU smoke check)")
    ap.add_argument("--layers", type=int, help="layers to keep (default: GPU mode what fits, smoke 2)")
    ap.add_argument("--new", type=int, help="new tokens per row (default: GPU 64, smoke 8)")
    ap.add_argument("--prefill", type=int, help="prefill prompt tokens at batch 1 (default: GPU 2048, smoke 64)")
    ap.add_argument("--reps", type=int, help="timed repetitions (default: GPU 3, smoke 1)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with C.quiet_stdout():
        record = run(args)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        C.emit(record)


if __name__ == "__main__":
    main()
