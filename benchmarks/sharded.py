"""Step time of prefill and decode on 1 device vs a mesh of 8 simulated CPU devices (small bench config).

    python benchmarks/sharded.py [--quick] [--config small] [--mesh data=1,expert=4,tensor=2]

Informative on CPU only: the 8 "devices" share this machine's cores, so the figure shows the overhead
of the sharded program (collectives, shard_map), not a speed-up; real figures come from TPUs/GPUs.
Prefill: one forward of a [batch, 128] prompt returning the last logits. Decode: the mean step time of
a 32-token greedy decode after a 128-token prompt (`Generator.stream`, prefill excluded). The same
random float32 weights on both sides; the outputs are checked to agree. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--mesh", default="data=1,expert=4,tensor=2")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 2 if args.quick else 5

    with C.quiet_stdout():
        import jax

        jax.config.update("jax_num_cpu_devices", 8)
        import numpy as np

        from mistral4_jax import Mistral4, Mistral4Config
        from mistral4_jax import model as M
        from mistral4_jax.serve.generate import Request
        from mistral4_jax.sharding import make_mesh

        cfg = Mistral4Config.from_json(C.config_path(args.config))
        params = M.init_params(cfg, jax.random.key(0))
        rng = np.random.default_rng(0)
        prompts = {b: rng.integers(3, cfg.vocab_size - 1, size=(b, 128)) for b in (1, 8)}
        record: dict = {"bench": "sharded", "config": args.config, "mesh": args.mesh, "devices": jax.device_count()}
        outputs = {}
        for label, mesh in (("1dev", None), ("8dev", make_mesh(args.mesh))):
            model = Mistral4(cfg, params, mesh=mesh)
            for b in (1, 8):
                ids = prompts[b]
                f = lambda: jax.block_until_ready(model.forward(ids, last_only=True)[0])  # noqa: E731
                f()
                record[f"prefill_ms_b{b}_{label}"] = round(C.median(C.timeit(f, reps)) * 1e3, 2)
                outputs[(label, b)] = np.asarray(model.forward(ids, last_only=True)[0])
                requests = [Request(r.tolist(), 32) for r in ids]

                def decode():
                    it = model.generator.stream(requests, [cfg.vocab_size - 1])
                    next(it)
                    t0 = time.perf_counter()
                    for _ in it:
                        pass
                    return (time.perf_counter() - t0) / 31

                decode()
                record[f"decode_step_ms_b{b}_{label}"] = round(C.median([decode() for _ in range(reps)]) * 1e3, 2)
                C.log(label, b, record)
        record["max_abs_diff_logits"] = float(max(np.abs(outputs[("1dev", b)] - outputs[("8dev", b)]).max() for b in (1, 8)))
        record.update(machine=C.machine(), **C.versions())
    C.emit(record)


if __name__ == "__main__":
    main()
