"""Prefill throughput of mistral4_jax vs transformers' Mistral4ForCausalLM, plus compile time vs depth.

    python benchmarks/forward.py [--quick] [--config small] [--tokens 128]

Both sides run the same random float32 weights (built by transformers from `configs/<config>.json`,
saved with `save_pretrained`, loaded into ours with `mistral4_jax.load`) on the same random prompts of
`--tokens` tokens at batch 1 and batch 8, and do the same work: a full prefill that returns the logits
of the last position only (`logits_to_keep=1` under `torch.inference_mode()` for transformers,
`model.forward(ids, last_only=True)` + `jax.block_until_ready` for ours). Ours is timed twice: as
`load` gives it by default (`layer_loop="auto"`, unrolled layers on CPU: `ours_*`, `ratio_*`) and with
the layers under `lax.scan` (`ours_scan_*`, `ratio_scan_*`; the layout accelerators use by default).
Each side is warmed up first (ours compiles once per shape), then timed in blocks of consecutive calls
(two rounds, the second in reverse order); the median over all timed calls is reported (and the best
call, as `*_best`).

In the same run it measures the machine's float32 matmul rate (jitted jnp 2048x2048 @ 2048x2048,
sampled before and between the timed blocks; median) and reports ours as a fraction of it (analytic
FLOPs per token, see `prefill_flops_per_token`, times tokens/s); and the lower+compile seconds of the
forward pass of the tiny config at 2 and 36 layers (the layers are scanned, so 36 layers must compile
in no more than ~1.5x the 2-layer time). The machine is shared: `other_cpu_b*` is the share of its CPU
time that other processes used while each batch size was timed (0 = quiet); read the numbers with it.

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

BATCHES = (1, 8)
COMPILE_DEPTHS = (2, 36)


def prefill_flops_per_token(cfg, tokens: int) -> float:
    """Analytic FLOPs per prompt token of a causal prefill of `tokens` tokens returning the last logits.

    Counts the matmuls a prefill needs (2 FLOPs per multiply-add), nothing else (norms, rope, softmax,
    routing arithmetic and the gather/scatter of tokens to experts are left out). With D hidden,
    N heads, Q q_lora rank, L kv_lora rank, P nope / R rope / V value head dims, E routed experts,
    K experts per token, F expert hidden, S shared hidden (= F * n_shared_experts), I dense hidden,
    X vocabulary and T prompt tokens, per token and layer:

        attention projections   A = D*Q + Q*N*(P+R)            (q LoRA; D*N*(P+R) without it)
                                  + D*(L+R)                    (kv_a: latent + shared rope key)
                                  + L*N*P + L*N*V              (k_b, v_b: expand the latent per head)
                                  + N*V*D                      (o_proj)
        scores and values       C = N*(P+R)*c + N*V*c,  c = (T+1)/2, the mean causal context
        MoE layer               M = D*E + K*3*D*F + 3*D*S      (router, top-k routed experts, shared)
        dense layer             M = 3*D*I                      (the first `first_k_dense_replace`)

        FLOPs/token = 2 * [ sum over layers (A + C + M)  +  D*X / T ]

    the last term being the lm_head applied to the last position only, shared by the T tokens.
    """
    d, n, lat = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    p, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    h = p + r
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * n * h if cfg.q_lora_rank else d * n * h
    attn = q + d * (lat + r) + lat * n * p + lat * n * v + n * v * d
    ctx = (tokens + 1) / 2
    attn += n * h * ctx + n * v * ctx
    e, k, f = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    moe = d * e + k * 3 * d * f + 3 * d * cfg.shared_intermediate_size
    dense = 3 * d * cfg.intermediate_size
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    macs = n_dense * (attn + dense) + n_moe * (attn + moe) + d * cfg.vocab_size / tokens
    return 2.0 * macs


def compile_seconds(cfg, layers: int, tokens: int, reps: int) -> float:
    """Median seconds to lower + compile the forward pass (batch 1, `tokens` tokens, last position only).

    The model is `mistral4_jax.Mistral4(cfg, params, layer_loop="scan")` with `layers` layers and abstract parameters
    (`mistral4_jax.model.abstract_params`: shapes and dtypes are all compilation needs); its `apply`
    runs under a fresh `jax.jit` of a fresh function for every repetition, so nothing is served from
    jit's caches.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mistral4_jax
    from mistral4_jax.api import positions_from_mask
    from mistral4_jax.model import abstract_params

    cfg = cfg.replace(num_hidden_layers=layers)
    params = abstract_params(cfg, jnp.float32)
    model = mistral4_jax.Mistral4(cfg, params, dtype="float32", layer_loop="scan")
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, tokens), jnp.int32)

    times = []
    for _ in range(reps):

        def forward(params, input_ids, attention_mask):  # a new function each time: jit caches per function
            positions = positions_from_mask(attention_mask)
            return model.apply(params, input_ids, positions, attention_mask.astype(bool), last_only=True)[0]

        t0 = time.perf_counter()
        jax.jit(forward).lower(params, ids, mask).compile()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    import torch

    import mistral4_jax

    reps = 4 if args.quick else args.reps
    cfg = mistral4_jax.Mistral4Config.from_json(C.config_path(args.config))
    tokens = args.tokens
    flops_tok = prefill_flops_per_token(cfg, tokens)
    C.log(f"config {args.config}: {cfg.num_hidden_layers} layers, {flops_tok / 1e6:.1f} MFLOP/token at T={tokens}")

    mm = C.MatmulRate().sample(5 if args.quick else 10)
    torch_gflops = C.torch_matmul_gflops(reps=5 if args.quick else 10)
    C.log(f"float32 matmul 2048^3: jax {mm.gflops():.1f} GFLOP/s, torch {torch_gflops:.1f} GFLOP/s")

    rng = np.random.default_rng(0)
    record: dict = {"bench": "forward", "config": args.config, "tokens": tokens}
    with tempfile.TemporaryDirectory(prefix="m4bench-") as tmp:
        hf = C.save_hf_reference(cfg, tmp, seed=0)
        ours = mistral4_jax.load(tmp, dtype="float32")  # layer_loop "auto": unrolled on CPU
        ours_scan = mistral4_jax.load(tmp, dtype="float32", layer_loop="scan")
        record["layer_loop"] = ours.layer_loop
        for b in BATCHES:
            ids = rng.integers(0, cfg.vocab_size, (b, tokens), dtype=np.int64)
            ids_t = torch.from_numpy(ids)

            def run_ours(ids=ids):
                return jax.block_until_ready(ours.forward(ids, last_only=True))

            def run_scan(ids=ids):
                return jax.block_until_ready(ours_scan.forward(ids, last_only=True))

            def run_hf(ids_t=ids_t):
                with torch.inference_mode():
                    return hf(input_ids=ids_t, logits_to_keep=1).logits

            t0 = time.perf_counter()
            out = run_ours()
            first_call = time.perf_counter() - t0
            C.log(f"b{b}: ours first call (compile + run) {first_call:.2f}s")
            run_scan()
            ref = run_hf()
            diff = float(np.max(np.abs(np.asarray(out[0])[:, -1] - ref[:, -1].numpy())))
            C.log(f"b{b}: max |logit diff| last position {diff:.2e}")
            if not diff <= 1e-3:
                C.log(f"WARNING: b{b}: ours and transformers disagree (max |logit diff| {diff:.3g} > 1e-3)")
            # Blocks, not alternating single calls: alternating made transformers' timings far slower and
            # noisier in trials here. Each block starts with warm-up calls; the second round runs in the
            # opposite order so that drift in the machine's load is shared out.
            t_ours, t_hf, t_scan = [], [], []
            sides = {"ours": (run_ours, t_ours), "hf": (run_hf, t_hf), "scan": (run_scan, t_scan)}
            load = C.OtherLoad().start()
            for order in (("ours", "hf", "scan"), ("scan", "hf", "ours")):
                for side in order:
                    fn, acc = sides[side]
                    C.timeit(fn, args.warmup)
                    acc += C.timeit(fn, -(-reps // 2))
                mm.sample(3)  # the matmul rate under the same conditions as the timings it is compared with
            other = load.stop()
            ours_tok_s = b * tokens / C.median(t_ours)
            hf_tok_s = b * tokens / C.median(t_hf)
            C.log(
                f"b{b}: ours {ours_tok_s:.0f} tok/s (median {C.median(t_ours) * 1e3:.1f} ms, "
                f"min {min(t_ours) * 1e3:.1f}), transformers {hf_tok_s:.0f} tok/s "
                f"(median {C.median(t_hf) * 1e3:.1f} ms, min {min(t_hf) * 1e3:.1f}), ratio {ours_tok_s / hf_tok_s:.2f}; other processes used "
                f"{'?' if other is None else f'{other:.0%}'} of the CPUs meanwhile"
            )
            record[f"ours_tok_s_b{b}"] = round(ours_tok_s, 1)
            record[f"hf_tok_s_b{b}"] = round(hf_tok_s, 1)
            record[f"ratio_b{b}"] = round(ours_tok_s / hf_tok_s, 3)
            record[f"ratio_b{b}_best"] = round(min(t_hf) / min(t_ours), 3)
            record[f"ours_tok_s_b{b}_best"] = round(b * tokens / min(t_ours), 1)
            record[f"ours_scan_tok_s_b{b}"] = round(b * tokens / C.median(t_scan), 1)
            record[f"ratio_scan_b{b}"] = round(C.median(t_hf) / C.median(t_scan), 3)
            record[f"hf_tok_s_b{b}_best"] = round(b * tokens / min(t_hf), 1)
            record[f"max_abs_logit_diff_b{b}"] = diff
            record[f"other_cpu_b{b}"] = None if other is None else round(other, 3)
            record[f"ours_first_call_s_b{b}"] = round(first_call, 2)

    gflops = mm.gflops()
    C.log(f"float32 matmul 2048^3 over the run: median {gflops:.1f} GFLOP/s, best {mm.best():.1f}")
    record["matmul_gflops"] = round(gflops, 1)
    record["matmul_gflops_best"] = round(mm.best(), 1)
    record["torch_matmul_gflops"] = round(torch_gflops, 1)
    record["mflop_per_token"] = round(flops_tok / 1e6, 3)
    for b in BATCHES:
        record[f"ours_frac_of_matmul_b{b}"] = round(record[f"ours_tok_s_b{b}"] * flops_tok / (gflops * 1e9), 3)
        record[f"hf_frac_of_matmul_b{b}"] = round(record[f"hf_tok_s_b{b}"] * flops_tok / (gflops * 1e9), 3)

    tiny = mistral4_jax.Mistral4Config.from_json(C.config_path("tiny"))
    compile_reps = 1 if args.quick else 3
    compile_seconds(tiny, COMPILE_DEPTHS[0], tokens, 1)  # warm-up: first-use costs of tracing/lowering
    for layers in COMPILE_DEPTHS:
        s = compile_seconds(tiny, layers, tokens, compile_reps)
        C.log(f"tiny config, {layers} layers: lower + compile {s:.2f}s")
        record[f"compile_s_{layers}_layers"] = round(s, 3)
    record["compile_ratio"] = round(record["compile_s_36_layers"] / record["compile_s_2_layers"], 3)

    record.update(C.versions())
    record["torch_threads"] = torch.get_num_threads()
    record["machine"] = C.machine()
    record["reps"] = reps
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", help="config name in configs/ or a path (default: small)")
    ap.add_argument("--tokens", type=int, default=128, help="prompt length (default: 128)")
    ap.add_argument("--reps", type=int, default=16,
                    help="timed calls per side and batch, split over two rounds (default: 16)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before each timed block (default: 2)")
    ap.add_argument("--quick", action="store_true", help="4 timed calls, fewer matmul and compile repetitions")
    args = ap.parse_args(argv)
    with C.quiet_stdout():
        record = run(args)
        C.emit(record)


if __name__ == "__main__":
    main()
