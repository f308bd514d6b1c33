"""Long context on CPU: chunked prefill tok/s, decode ms/token and peak memory as the context grows.

    python benchmarks/longctx.py [--contexts 4096,16384,65536] [--chunks 512,1024,2048,4096] [--chunk-context 16384]
                                 [--config tiny] [--layers 1] [--heads 1] [--new 32] [--reps 3]

The model: random weights (`model.init_params`, seed 0, float32) for `configs/<config>.json` with
`num_hidden_layers` and `num_attention_heads` overridden (default: tiny.json, 1 layer, 1 head, so a
65,536-token prompt runs in about a minute on 2 shared cores; the latent cache and the attention loops
are what the context scales, and they are the real ones). No torch, nothing downloaded.

For each context T (one prompt of T random tokens, batch 1, `model.prefill_chunk` tokens per chunk; run
`--reps` times up to `--chunk-context` tokens, once above; after a warm-up on a 600-token prompt):
  prefill_tok_s       T / seconds to the first token (`Generator.stream`), median over the repetitions,
                      compilation excluded (the seconds jax reports tracing, lowering and compiling,
                      `jax.monitoring` /jax/core/compile/*, are subtracted; `compile_s`)
  decode_ms_per_token median over chunks of 8 decode steps after the prompt (`--new` tokens per run)
  cache_slots / cache_mib   the latent cache generate allocates (grid of `serve.generate.cache_slots`)
  peak_growth_mib     VmHWM during the runs minus VmRSS before them (`rss_before_mib`; VmHWM reset through
                      /proc/self/clear_refs); freed memory stays with the allocator, so later runs reuse it
  full_scores_mib     T^2 x heads x 4 bytes: one layer's float32 score matrix, what unchunked attention needs
Then `decode_linear_fit`: least squares decode_ms = a + b x cache_slots over the contexts (r2 near 1: the
cost per token grows linearly with the cache read), and `decode_ratios`: for consecutive contexts, the ratio
of their decode ms/token next to the ratios of their cache slots and of the contexts.
`chunks`: prefill tok/s and peak growth for each chunk size at `--chunk-context` tokens (to choose
`serve.generate.PREFILL_CHUNK`). `other_cpu` is the share of the machine other processes used meanwhile.

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

DECODE_CHUNK = 8  # decode steps between host reads (one timing each)


def memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    with open("/proc/self/status") as f:
        d = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    return d["VmRSS"], d["VmHWM"]


def reset_peak() -> None:
    """Set VmHWM back to the current VmRSS (Linux: "5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class CompileClock:
    """Seconds jax spends tracing, lowering and compiling (its `/jax/core/compile/` duration events)."""

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_: object) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration


def slots_for(context: int, new: int, chunk: int) -> int:
    """Cache slots `Generator.stream` allocates for one prompt of `context` tokens and `new` new tokens."""
    from mistral4_jax.serve.generate import bucket, cache_slots

    n = bucket(new)
    return cache_slots(-(-context // chunk) * chunk + n, chunk) if context > chunk else bucket(context) + n


def run(model, context: int, new: int, clock: CompileClock, reps: int = 1) -> dict:
    """Generate `new` tokens after one random prompt of `context` tokens, `reps` times: timings (medians over the
    repetitions) and memory (the peak over all of them), as the module docstring describes."""
    import jax
    import numpy as np

    from mistral4_jax.model import init_cache
    from mistral4_jax.serve.generate import Request

    cfg = model.config
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, size=context).tolist()
    load = C.OtherLoad().start()
    reset_peak()
    rss0 = memory()[0]
    prefill, compile_s, steps = [], 0.0, []
    for _ in range(reps):
        compiled0 = clock.seconds
        t0 = time.perf_counter()
        stream = model.generator.stream([Request(prompt, new)], [], chunk=DECODE_CHUNK)
        next(stream)
        wall = time.perf_counter() - t0
        compile_s += clock.seconds - compiled0
        prefill.append(wall - (clock.seconds - compiled0))
        while True:
            t1 = time.perf_counter()
            try:
                got = next(stream)
            except StopIteration:
                break
            steps.append((time.perf_counter() - t1) / len(got[0]))
        assert len(stream.result[0].tokens) == new
    peak = memory()[1]
    slots = slots_for(context, new, model.prefill_chunk)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, slots, model.generator.cache_dtype))
    prefill_s = C.median(prefill)
    return {
        "context": context, "chunk": model.prefill_chunk, "reps": reps,
        "prefill_tok_s": round(context / prefill_s, 1), "prefill_s": round(prefill_s, 3),
        "compile_s": round(compile_s, 2),
        "decode_ms_per_token": round(C.median(steps) * 1e3, 3),
        "cache_slots": slots,
        "cache_mib": round(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 2**20, 2),
        "rss_before_mib": round(rss0 / 2**20, 1), "peak_growth_mib": round((peak - rss0) / 2**20, 1),
        "full_scores_mib": round(context**2 * cfg.num_attention_heads * 4 / 2**20, 1),
        "other_cpu": None if (o := load.stop()) is None else round(o, 2),
    }


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b x: intercept a, slope b, r2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_ms": round(a, 4), "us_per_1k_slots": round(b * 1e6, 3),
            "r2": round(1 - ss_res / ss_tot, 4) if ss_tot > 0 else None}


def decode_scaling(rows: list[dict]) -> dict:
    """Decode cost against the cache read: the linear fit over all contexts, and for each pair of consecutive
    contexts the ratio of their decode ms/token next to the ratios of their cache slots and contexts."""
    if len(rows) < 2:
        return {"decode_linear_fit": None, "decode_ratios": []}
    xs, ys = [r["cache_slots"] for r in rows], [r["decode_ms_per_token"] for r in rows]
    return {"decode_linear_fit": linear_fit(xs, ys), "decode_ratios": [
        {"contexts": f"{b['context']}/{a['context']}",
         "decode": round(b["decode_ms_per_token"] / a["decode_ms_per_token"], 2),
         "slots": round(b["cache_slots"] / a["cache_slots"], 2), "context": round(b["context"] / a["context"], 2)}
        for a, b in zip(rows, rows[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--contexts", default="4096,16384,65536")
    ap.add_argument("--chunks", default="512,1024,2048,4096", help="chunk sizes to time at --chunk-context ('' = none)")
    ap.add_argument("--chunk-context", type=int, default=16384)
    ap.add_argument("--new", type=int, default=32, help="tokens generated after each prompt")
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions of each chunk-size point and of each context up to --chunk-context (median)")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    chunks = [int(x) for x in args.chunks.split(",") if x]

    with C.quiet_stdout():
        import jax

        from mistral4_jax import Mistral4, Mistral4Config
        from mistral4_jax.model import init_params

        cfg = Mistral4Config.from_json(C.config_path(args.config)).replace(
            num_hidden_layers=args.layers, num_attention_heads=args.heads)
        model = Mistral4(cfg, init_params(cfg, jax.random.key(0)), dtype="float32")
        model.verbose = False
        default_chunk = model.prefill_chunk
        clock = CompileClock()
        t_start = time.perf_counter()
        model.prefill_chunk = 256
        C.log("warm-up", run(model, 600, args.new, clock))  # one-time start-up memory out of the first context's
        model.prefill_chunk = default_chunk
        rows = []
        for t in sorted(contexts):
            rows.append(run(model, t, args.new, clock, args.reps if t <= args.chunk_context else 1))
            C.log(rows[-1])
        sweep = []
        for c in chunks:
            model.prefill_chunk = c
            done = [r for r in rows if r["context"] == args.chunk_context and r["chunk"] == c]
            sweep.append(done[0] if done else run(model, args.chunk_context, args.new, clock, args.reps))
            C.log(sweep[-1])
        model.prefill_chunk = default_chunk
        record: dict = {
            "bench": "longctx", "config": args.config, "layers": args.layers, "heads": args.heads,
            "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim, "hidden": cfg.hidden_size,
            "dtype": "float32", "prefill_chunk": default_chunk, "new_tokens": args.new,
            "contexts": rows, **decode_scaling(rows),
            "max_peak_growth_mib": max(r["peak_growth_mib"] for r in rows),
            "largest_context_peak_growth_over_full_scores":
                round(rows[-1]["peak_growth_mib"] / rows[-1]["full_scores_mib"], 4),
            "chunk_context": args.chunk_context,
            "chunks": [{k: r[k] for k in ("chunk", "prefill_tok_s", "peak_growth_mib", "compile_s", "other_cpu")}
                       for r in sweep],
            "process_peak_rss_mib": round(max(r["rss_before_mib"] + r["peak_growth_mib"] for r in rows + sweep), 1),
            "wall_s": round(time.perf_counter() - t_start, 1),
            "load_avg": round(os.getloadavg()[0], 2), "machine": C.machine(), **C.versions(),
        }
    C.emit(record)


if __name__ == "__main__":
    main()
