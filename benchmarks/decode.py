"""Decode throughput of mistral4_jax vs transformers' `generate`, and ours against the memory-bandwidth bound.

    python benchmarks/decode.py [--quick] [--config small] [--prompt 128] [--new 64] [--layer-loop auto]

Both sides run the same random float32 weights (built by transformers from `configs/<config>.json`,
saved, loaded into ours) on `--prompt`-token prompts at batch 1 and batch 8, generating exactly `--new`
tokens greedily (no stop token can end a row early). Tokens/s = batch x new tokens / wall time of the
whole call (prefill included) for both sides. Ours is also split into prefill and decode steps
(`Generator.stream`: the first chunk arrives after prefill), giving the decode step time.

Bandwidth bound (batch 1): a decode step must read every weight it uses once: attention, router,
shared expert and the K chosen experts of every layer, the final norm and lm_head, one embedding row
(`weight_bytes_per_token`). bound = bytes / streaming-read rate, the rate measured in the same run
(a jitted sum over a 512 MiB float32 array); fraction = bound / measured step time. Also printed: the
KV-cache bytes per token (kv_lora + qk_rope numbers per layer).

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

BATCHES = (1, 8)


def weight_bytes_per_token(cfg, itemsize: int = 4) -> int:
    """Bytes of weights a batch-1 decode step reads (see the module docstring)."""
    from mistral4_jax.model import abstract_params

    params = abstract_params(cfg)
    total = 0
    for group in ("layers_dense", "layers_moe"):
        if group not in params:
            continue
        for name, leaf in _flat(params[group]):
            size = int(leaf.size)
            if name.startswith("moe/experts_"):
                size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
            total += size
    total += int(params["final_norm"]["scale"].size) + cfg.hidden_size
    total += int(params["lm_head"].size) if "lm_head" in params else int(params["embed"].size)
    return total * itemsize


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def time_ours(model, requests) -> tuple[float, float, list]:
    """(prefill seconds, decode seconds, `Generation`s) of one `model.generator.stream` call without stop
    tokens (every row runs to its budget): the first chunk arrives after prefill, the rest is decoding."""
    t0 = time.perf_counter()
    it = model.generator.stream(requests, [])
    next(it)
    t1 = time.perf_counter()
    for _ in it:
        pass
    return t1 - t0, time.perf_counter() - t1, it.result


def hf_generate(hf, ids, new: int, stop: int) -> None:
    """transformers' greedy `generate` of exactly `new` tokens after the prompts `ids` [B, T] (a torch tensor
    on the model's device), waiting for the device to finish."""
    import torch

    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, eos_token_id=stop)
    if out.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new


def read_rate_gbs(mib: int = 512, reps: int = 10) -> float:
    """Streaming-read rate: GB/s of a jitted float32 sum over `mib` MiB."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 1024 * 1024 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(x))
    times = C.timeit(lambda: jax.block_until_ready(f(x)), reps)
    return x.nbytes / C.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unroll"],
                    help="as `mistral4_jax.load` (auto: unrolled on CPU)")
    ap.add_argument("--quick", action="store_true", help="one timed repetition instead of three")
    args = ap.parse_args()
    reps = 1 if args.quick else 3

    with C.quiet_stdout():
        import numpy as np
        import torch

        import mistral4_jax
        from mistral4_jax import Mistral4Config
        from mistral4_jax.serve.generate import Request

        cfg = Mistral4Config.from_json(C.config_path(args.config))
        never = cfg.vocab_size - 1  # transformers needs a stop id (min_new_tokens keeps it from ending a row); ours runs without
        with tempfile.TemporaryDirectory() as tmp:
            hf = C.save_hf_reference(cfg, tmp)
            ours = mistral4_jax.load(tmp, dtype="float32", layer_loop=args.layer_loop)
        rng = np.random.default_rng(0)
        record: dict = {"bench": "decode", "config": args.config, "prompt_tokens": args.prompt, "new_tokens": args.new,
                        "layer_loop": ours.layer_loop}
        for b in BATCHES:
            prompts = rng.integers(3, cfg.vocab_size - 1, size=(b, args.prompt))
            requests = [Request(p.tolist(), args.new) for p in prompts]

            def run_ours():
                return time_ours(ours, requests)

            C.log(f"batch {b}: compiling ours")
            run_ours()
            ours_times = [run_ours() for _ in range(reps)]
            ours_total = C.median([p + d for p, d, _ in ours_times])
            step = C.median([d for _, d, _ in ours_times]) / (args.new - 1)
            assert all(len(g.tokens) == args.new for g in ours_times[-1][2])

            ids = torch.tensor(prompts)

            def run_hf():
                hf_generate(hf, ids, args.new, never)

            C.log(f"batch {b}: transformers")
            run_hf()
            hf_total = C.median(C.timeit(run_hf, reps))
            record[f"ours_tok_s_b{b}"] = round(b * args.new / ours_total, 2)
            record[f"hf_tok_s_b{b}"] = round(b * args.new / hf_total, 2)
            record[f"ratio_b{b}"] = round(hf_total / ours_total, 2)
            record[f"ours_step_ms_b{b}"] = round(step * 1e3, 3)
            record[f"ours_prefill_s_b{b}"] = round(C.median([p for p, _, _ in ours_times]), 4)
        bytes_tok = weight_bytes_per_token(cfg)
        rate = read_rate_gbs()
        bound = bytes_tok / (rate * 1e9)
        record.update(
            weight_mb_per_token_b1=round(bytes_tok / 1e6, 2),
            read_rate_gbs=round(rate, 2),
            bound_step_ms_b1=round(bound * 1e3, 3),
            ours_frac_of_bandwidth_bound_b1=round(bound / (record["ours_step_ms_b1"] / 1e3), 3),
            kv_bytes_per_token=(cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4),
            torch_threads=torch.get_num_threads(),
            machine=C.machine(),
            **C.versions(),
        )
    C.emit(record)


if __name__ == "__main__":
    main()
