"""Continuous batching against static batching: throughput and time to first token at several concurrencies.

    python benchmarks/serve.py [--config small] [--requests 64] [--concurrency 1,8,32] [--quick]

The model: random weights (`model.init_params`, seed 0, float32) for `configs/<config>.json`, on this machine's
CPU. The workload: `--requests` requests with token-id prompts of 8-96 tokens and mixed output lengths (a
long-tailed draw: most answers 8-48 tokens, one in five 96-160), greedy, no stop token (every request runs to
its max_tokens, so both ways generate exactly the same tokens). At concurrency C the client keeps C requests
outstanding (a closed loop: a new one is sent when one ends):

  continuous   `serve.engine.Engine` with C decode rows (8 decode steps per device call): a request is prefilled
               into a free row as soon as one ends, while the other rows keep decoding
  static       `Mistral4.generate` on fixed batches of C requests in the same order: a batch starts when the
               previous one has ended (all its rows, so short answers wait for the batch's longest)

tokens/s = generated tokens / wall time (from the first request to the last token); ttft = mean seconds from a
request being sent to its first token (static: its batch's prefill is done, the first chunk of
`Generator.stream`). Both are timed after a warm-up run of the same workload that compiles every program (medians
of `--reps` runs). `ratio_c{C}` = continuous / static tokens/s. The engine is driven in-process (no HTTP: the
server adds the same JSON and socket work to both ways). `other_cpu`: the share of the machine other processes
used meanwhile (0 = quiet).

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of n requests (module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, vocab - 1, int(rng.integers(8, 97))).tolist()
        new = int(rng.integers(96, 161)) if rng.random() < 0.2 else int(rng.integers(8, 49))
        out.append((prompt, new))
    return out


def continuous(model, jobs, c: int) -> tuple[float, float, int]:
    """(seconds, mean ttft, tokens) of the closed loop over an engine of c rows."""
    from mistral4_jax.serve.engine import Engine
    from mistral4_jax.serve.generate import Request

    engine = getattr(model, "_bench_engines", {}).get(c)
    if engine is None:  # one engine (and cache) per concurrency, reused across repetitions
        engine = Engine(model, rows=c, max_context=320, steps_per_call=8, max_queue=len(jobs), stop_token_ids=[])
        model._bench_engines = {**getattr(model, "_bench_engines", {}), c: engine}
    pending = list(jobs)
    sent = []
    t0 = time.perf_counter()

    def send() -> None:
        prompt, new = pending.pop(0)
        sent.append(engine.submit(Request(prompt, new)))

    for _ in range(min(c, len(pending))):
        send()
    while any(j.result is None for j in sent) or pending:
        engine.step()
        for _ in range(sum(j.result is not None for j in sent) + c - len(sent)):
            if pending:
                send()
    seconds = time.perf_counter() - t0
    ttft = sum(j.first_token - j.submitted for j in sent) / len(sent)
    return seconds, ttft, sum(len(j.result.tokens) for j in sent)


def static(model, jobs, c: int) -> tuple[float, float, int]:
    """(seconds, mean ttft, tokens) of fixed batches of c requests, one after the other."""
    from mistral4_jax.serve.generate import Request

    t0 = time.perf_counter()
    ttft, tokens = [], 0
    for i in range(0, len(jobs), c):
        batch = [Request(p, n) for p, n in jobs[i:i + c]]
        sent = time.perf_counter()
        stream = model.generator.stream(batch, [])
        for k, _ in enumerate(stream):
            if k == 0:
                ttft += [time.perf_counter() - sent] * len(batch)
        tokens += sum(len(g.tokens) for g in stream.result)
    return time.perf_counter() - t0, sum(ttft) / len(ttft), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one timed repetition, 32 requests")
    args = ap.parse_args()
    reps, n = (1, min(args.requests, 32)) if args.quick else (args.reps, args.requests)

    with C.quiet_stdout():
        import jax

        from mistral4_jax import Mistral4, Mistral4Config
        from mistral4_jax import model as M

        cfg = Mistral4Config.from_json(C.config_path(args.config))
        model = Mistral4(cfg, M.init_params(cfg, jax.random.key(0)))
        model.verbose = False
        jobs = workload(n, cfg.vocab_size)
        record: dict = {"bench": "serve", "config": args.config, "requests": n,
                        "generated_tokens": sum(new for _, new in jobs), "reps": reps}
        load = C.OtherLoad().start()
        for c in (int(x) for x in args.concurrency.split(",")):
            for name, fn in (("continuous", continuous), ("static", static)):
                C.log(f"concurrency {c}, {name}: warm-up (compiles)")
                fn(model, jobs, c)
                runs = [fn(model, jobs, c) for _ in range(reps)]
                seconds = C.median([r[0] for r in runs])
                assert all(r[2] == record["generated_tokens"] for r in runs), "a request lost tokens"
                record[f"{name}_tok_s_c{c}"] = round(record["generated_tokens"] / seconds, 1)
                record[f"{name}_ttft_s_c{c}"] = round(C.median([r[1] for r in runs]), 4)
                C.log(f"concurrency {c}, {name}: {record[f'{name}_tok_s_c{c}']} tokens/s, "
                      f"ttft {record[f'{name}_ttft_s_c{c}']} s")
            record[f"ratio_c{c}"] = round(record[f"continuous_tok_s_c{c}"] / record[f"static_tok_s_c{c}"], 3)
        record.update(other_cpu=load.stop(), machine=C.machine(), **C.versions())
    C.emit(record)


if __name__ == "__main__":
    main()
