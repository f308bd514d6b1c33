"""The running subcommands of the CLI: `plan`, `generate` (streaming or JSONL batch) and `chat`.

Multi-host: with `--coordinator HOST:PORT --num-processes N --process-id I` (or the usual
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables, or nothing on a
TPU pod where jax finds its peers itself with `--distributed`), every host runs the same command;
each restores only the shards it owns, and host 0 alone prints and writes outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- options
def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="converted checkpoint (or HF directory)")
    p.add_argument("--dtype", default=None, help="weights dtype: float32, bfloat16, float8_e4m3fn "
                   "(default: the checkpoint's; float32 for HF directories)")
    p.add_argument("--mesh", default=None, help="e.g. data=1,expert=4,tensor=2 (one axis may be -1); default one device")
    p.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unroll"],
                   help="scan (compile time flat in depth), unroll (much faster on CPU) or auto "
                        "(unroll on CPU without a mesh, else scan; the default)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (pods)")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reasoning-effort", default=None, help="none or high")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def init_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from flags or environment; no-op for a single process."""
    import jax

    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator or args.distributed:
        kwargs: dict[str, Any] = {}
        if coordinator:
            kwargs.update(coordinator_address=coordinator,
                          num_processes=args.num_processes or int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=args.process_id if args.process_id is not None else int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
        log.info("process %d of %d, %d devices in all", jax.process_index(), jax.process_count(), jax.device_count())


def load_model(args: argparse.Namespace) -> Any:
    import mistral4_jax
    from mistral4_jax import checkpoint
    from mistral4_jax.sharding import make_mesh

    init_distributed(args)
    dtype = args.dtype
    if dtype is None:
        dtype = checkpoint.read_manifest(args.checkpoint)["dtype"] if checkpoint.is_checkpoint(args.checkpoint) else "float32"
    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.perf_counter()
    model = mistral4_jax.load(args.checkpoint, dtype=dtype, mesh=mesh, layer_loop=args.layer_loop)
    log.info("loaded %s in %.1f s", args.checkpoint, time.perf_counter() - t0)
    return model


from .distributed import is_main_process  # noqa: E402  (host 0 alone prints and writes)


# ------------------------------------------------------------------------------------------ plan
def add_plan(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "plan", help="memory per device for weights and KV cache on a mesh (nothing allocated); "
                   "with --compile, compile for a TPU topology or GPUs and report the compiler's figures",
                   epilog="--compile TARGET: a TPU slice (v5e-4, v5e-16, v5e-256, v5p-8, v6e-8, v4-8, or a topology "
                          "such as v5e:2x2) or NxGPU (8xH200, 8xH100). Compiles one decode step and one prefill chunk "
                          "with abstract weights and cache (nothing allocated) and prints per chip the compiler's "
                          "memory against the chip's, collectives, compile time and a roofline. TPU targets need "
                          "`pip install 'mistral4-jax[tpu-aot]'`, GPU targets `pip install 'mistral4-jax[gpu-aot]'`.")
    p.add_argument("--config", required=True, help="configs/<name>.json, an HF config.json or a checkpoint directory")
    p.add_argument("--mesh", default=None, help="e.g. expert=8,tensor=2 (default: one device; with --compile, "
                   "experts over up to 8 chips, then tensor=2, the rest data)")
    p.add_argument("--devices", type=int, default=None, help="device count for a -1 axis (default: this machine's)")
    p.add_argument("--dtype", default="bfloat16", help="weights: float32, bfloat16, float8_e4m3fn")
    p.add_argument("--cache-dtype", default=None, help="KV cache dtype (default bfloat16 for FP8 weights, else the weights')")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hbm", default=None, help="memory per device, e.g. 16GiB; prints what fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--compile", default=None, metavar="TARGET", help="compile for this TPU topology or GPU target")
    p.add_argument("--compute-dtype", default="bfloat16", help="with --compile: activations dtype")
    p.add_argument("--chunk", type=int, default=None, help="with --compile: prefill chunk tokens (default min(context, 4096))")
    p.add_argument("--steps", default="decode,prefill", help="with --compile: decode, prefill or both")
    p.add_argument("--layers", type=int, default=None, help="with --compile: compile a model of this depth")
    p.add_argument("--layer-loop", default="scan", choices=["scan", "unroll"],
                   help="with --compile: scan (as it runs; flops and collectives from 1- and 2-layer unrolled "
                        "compiles) or unroll (one compile; slow for deep models)")
    p.add_argument("--no-cost", action="store_true", help="with --compile: memory only (skip the unrolled compiles)")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from mistral4_jax import Mistral4Config
    from mistral4_jax.api import resolve_dtype
    from mistral4_jax.plan import format_plan, memory_plan, parse_bytes
    from mistral4_jax.sharding import parse_mesh

    if args.compile:
        return _run_compile(args)
    cfg = Mistral4Config.from_json(args.config)  # a config file, an HF directory or a converted checkpoint
    mesh = parse_mesh(args.mesh or "data=1,expert=1,tensor=1", args.devices)
    plan = memory_plan(cfg, mesh, resolve_dtype(args.dtype), resolve_dtype(args.cache_dtype) if args.cache_dtype else None,
                       args.batch, args.context, parse_bytes(args.hbm) if args.hbm else None)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def _run_compile(args: argparse.Namespace) -> int:
    from mistral4_jax.aot import compile_plan, format_compiled

    plan = compile_plan(args.config, args.compile, mesh=args.mesh, dtype=args.dtype, compute_dtype=args.compute_dtype,
                        cache_dtype=args.cache_dtype, batch=args.batch, context=args.context, chunk=args.chunk,
                        steps=[s.strip() for s in args.steps.split(",") if s.strip()], layers=args.layers,
                        layer_loop=args.layer_loop, cost=not args.no_cost)
    print(json.dumps(plan.to_dict()) if args.json else format_compiled(plan))
    return 0


# -------------------------------------------------------------------------------------- generate
def add_generate(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "generate", help="generate from a prompt (streaming) or a JSONL batch of chat requests")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--prompt", default=None, help="user message; the answer streams to the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", default=[], help="image file for --prompt (repeatable)")
    p.add_argument("--input", default=None, help="requests.jsonl: one chat request per line")
    p.add_argument("--output", default=None, help="results.jsonl (with --input)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per device batch in --input mode")
    p.set_defaults(run=run_generate)


def _user_message(text: str, images: list[str]) -> dict[str, Any]:
    """A user turn: plain text, or image parts (file paths) followed by the text."""
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": path}} for path in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _messages(args: argparse.Namespace, text: str) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [_user_message(text, args.image)]


def run_generate(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.input):
        raise ValueError("give exactly one of --prompt or --input")
    if args.input and not args.output:
        raise ValueError("--input needs --output")
    model = load_model(args)
    if args.input:
        return _batch(model, args)
    _stream_answer(model, _messages(args, args.prompt), args)
    return 0


def _stream_answer(model: Any, messages: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Stream one answer to stdout; returns the answer's content."""
    from mistral4_jax.generate import Request
    from mistral4_jax.sampling import SamplingParams
    from mistral4_jax.tokenizer import split_reasoning

    tok = model.require_tokenizer()
    prompt, images = model.encode_chat(messages, reasoning_effort=args.reasoning_effort)  # images: --image files
    request = Request(prompt, args.max_new_tokens, SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p),
                      args.seed, tuple(images))
    decoder = tok.incremental_decoder(skip_special=False)
    main = is_main_process()
    t0 = time.perf_counter()
    tokens: list[int] = []
    for chunk in model.generator.stream([request], [tok.eos_id], chunk=8):
        tokens.extend(chunk[0])
        text = decoder.feed(chunk[0])
        if main and text:
            sys.stdout.write(text)
            sys.stdout.flush()
    if main:
        sys.stdout.write(decoder.flush() + "\n")
        result = model.generator.last_results[0]
        dt = time.perf_counter() - t0
        print(f"[{len(result.tokens)} tokens in {dt:.1f} s, {len(result.tokens) / max(dt, 1e-9):.1f} tokens/s, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return split_reasoning(tokens, tok)[1]


def _batch(model: Any, args: argparse.Namespace) -> int:
    from mistral4_jax import batch

    with open(args.input) as f:
        lines = f.read().splitlines()
    defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed}
    if args.reasoning_effort:
        defaults["reasoning_effort"] = args.reasoning_effort
    results = list(batch.run(model, lines, defaults, args.batch_size))
    if is_main_process():
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
    errors = sum("error" in r for r in results)
    log.info("%d requests, %d errors -> %s", len(results), errors, args.output)
    return 0


# ------------------------------------------------------------------------------------------ chat
def add_chat(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "chat", help="interactive chat session (/image PATH attaches an image to the next "
                                     "message, /reset clears the history, /exit quits)")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(run=run_chat, image=[])


def run_chat(args: argparse.Namespace) -> int:
    model = load_model(args)
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    base = list(history)
    images: list[str] = []  # attached to the next message
    print("chat: type a message; /image PATH attaches an image to the next one, /reset clears the history, "
          "/exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, images = list(base), []
            continue
        if line.startswith("/image"):
            path = os.path.expanduser(line[len("/image"):].strip())
            if not model.has_vision:
                print("chat: this model has no vision tower; /image is not available", file=sys.stderr)
            elif not os.path.isfile(path):
                print(f"chat: no such image file: {path!r}", file=sys.stderr)
            else:
                images.append(path)
                print(f"chat: {path} attached to the next message ({len(images)} image(s))", file=sys.stderr)
            continue
        if not line:
            continue
        message = _user_message(line, images)
        try:
            answer = _stream_answer(model, history + [message], args)
        except (ValueError, OSError) as e:  # e.g. an unreadable image: report it, keep the session
            print(f"chat: error: {e}", file=sys.stderr)
            images = []
            continue
        history += [message, {"role": "assistant", "content": answer}]
        images = []
    return 0
