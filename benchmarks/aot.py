"""Compiled figures of the real model for TPU and GPU targets, without the hardware (`mistral4_jax.plan.compile`).

    python benchmarks/aot.py [--targets v5e-16,v5p-8,v6e-8,8xH200] [--cases decode_1x4096,...] [--layers N]

For each target, FP8 weights with bf16 compute, the 36-layer real config, layers under `lax.scan` (as
they run), these programs: decode B=1 over a 4,096-slot cache, B=64 over 8,192, B=1 over 131,072 and
262,144 (the model's window), B=8 over 65,536; a 4,096-token prefill chunk, first of a prompt and last of a
262,144-token prompt prefilled in chunks (attending to the whole cache before it). Prints one JSON line per target: per chip the compiler's
memory against the chip's, fits, compile seconds (of the program; the two unrolled compiles that give
flops and collectives are timed apart), the roofline ms per step and tokens/s, the bytes a decode step
must read beside the bytes the compiled step moves through HBM (`plan.hlo.hbm_bytes`) and XLA's bytes
accessed, and the collectives. The cache's slots are split over the expert axis (`DEFAULT_RULES`' "cache_seq"). Compile times depend on this
machine and its load: the line carries the load average.

TPU targets need the `tpu-aot` extra, GPU targets the `gpu-aot` extra; a target whose compiler is not
installed prints a line with its `error`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

MESHES = {"v5e-16": "expert=8,tensor=2", "v5p-8": "expert=4", "v6e-8": "expert=8", "8xH200": "expert=8"}
CASES = {  # name: (step, batch, context, prefill chunk, layout changes to `sharding.DEFAULT_RULES`)
    "decode_1x4096": ("decode", 1, 4096, None, {}),
    "decode_64x8192": ("decode", 64, 8192, None, {}),
    "decode_1x131072": ("decode", 1, 131072, None, {}),
    "decode_1x262144": ("decode", 1, 262144, None, {}),
    "decode_8x65536": ("decode", 8, 65536, None, {}),
    "prefill_4096": ("prefill", 1, 4096, 4096, {}),
    "prefill_4096_at_262144": ("prefill", 1, 262144, 4096, {}),
}
GiB = 1024**3


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 3)


def case_record(plan, step, layout: dict | None = None) -> dict:
    """The figures of one compiled program, in GiB / ms / s."""
    rec = {"fits": step.fits, "compile_s": step.compile_s}
    if layout:
        rec["layout"] = layout
    if step.error is not None:
        rec["error"] = step.error
    else:
        rec.update(memory_gib=_gib(step.total_bytes), argument_gib=_gib(step.argument_bytes), temp_gib=_gib(step.temp_bytes),
                   output_gib=_gib(step.output_bytes), alias_gib=_gib(step.alias_bytes), weights_gib=_gib(plan.weight_bytes),
                   plan_weights_gib=_gib(plan.plan_weight_bytes))
    if step.reads_expected is not None:
        rec.update(must_read_gib=_gib(step.reads_expected), must_read_worst_gib=_gib(step.reads_worst))
    if step.flops is not None:
        rec.update(gflops=round(step.flops / 1e9, 2), cost_exact=step.cost_exact)
        if step.flops_needed:
            rec.update(gflops_needed=round(step.flops_needed / 1e9, 2), flops_over_needed=round(step.flops / step.flops_needed, 3))
    if step.hbm_bytes is not None:
        rec["hbm_gib"] = _gib(step.hbm_bytes)
        if step.reads_worst:
            rec["hbm_over_must_read_worst"] = round(step.hbm_bytes / step.reads_worst, 3)
    if step.bytes_accessed is not None:
        rec["bytes_accessed_gib"] = _gib(step.bytes_accessed)
        if step.reads_expected:
            rec["accessed_over_must_read"] = round(step.bytes_accessed / step.reads_expected, 3)
    if step.cost_compile_s is not None:
        rec["cost_compile_s"] = step.cost_compile_s
    if step.roofline_ms is not None:
        rec.update(roofline_ms=round(step.roofline_ms, 3), tokens_per_s=round(step.tokens_per_s, 1))
    if step.collectives is not None:
        rec["collectives"] = {c.kind: {"count": c.count, "mib": round(c.bytes / 2**20, 2)} for c in step.collectives}
    return rec


def commit() -> str:
    """The checked-out commit, with "+dirty" when tracked files differ from it."""
    try:
        git = ["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mistral-small-4-119b")
    ap.add_argument("--targets", default=",".join(MESHES))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtype", default="float8_e4m3fn")
    ap.add_argument("--layers", type=int, default=None, help="reduced depth (quick check)")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: the host's own backend is not used

    code = commit()  # the code that runs is the code at the start
    with C.quiet_stdout():
        from mistral4_jax.plan.compile import compile_plan
        from mistral4_jax.sharding import DEFAULT_RULES

        for target in args.targets.split(","):
            record: dict = {"bench": "aot", "target": target, "mesh": MESHES.get(target), "config": args.config,
                            "dtype": args.dtype, "compute_dtype": "bfloat16"}
            try:
                for name in args.cases.split(","):
                    step, batch, context, chunk, layout = CASES[name]
                    t0 = time.perf_counter()
                    plan = compile_plan(C.config_path(args.config), target, mesh=MESHES.get(target), dtype=args.dtype,
                                        batch=batch, context=context, chunk=chunk, steps=(step,), layers=args.layers,
                                        rules=DEFAULT_RULES.replace(**layout))
                    record.setdefault("chips", plan.chips)
                    record.setdefault("chip", plan.kind)
                    record.setdefault("hbm_gib", _gib(plan.hbm_bytes))
                    record.setdefault("layers", plan.layers)
                    record["mesh"] = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
                    record[name] = case_record(plan, plan.steps[0], layout)
                    C.log(target, name, f"{time.perf_counter() - t0:.0f} s", record[name])
            except ValueError as e:  # the target's compiler is not installed, or a bad target / mesh
                record["error"] = str(e)
            record.update(load_avg=round(os.getloadavg()[0], 2), date=datetime.date.today().isoformat(), commit=code,
                          machine=C.machine(), **C.versions())
            C.emit(record)


if __name__ == "__main__":
    main()
