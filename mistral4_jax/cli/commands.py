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

from ..api import DTYPES
from ..plan.memory import parse_bytes
from ..serve.sampling import SamplingParams
from ..serve.chat import REASONING_EFFORTS

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- options
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def memory_size(text: str) -> int:
    """argparse type: "16GiB", "80GB", "1.5 TiB", "123" -> bytes."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="converted checkpoint (or HF directory)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: the checkpoint's; float32 for HF directories)")
    p.add_argument("--mesh", default=None, help="e.g. data=1,expert=4,tensor=2 (one axis may be -1); default one device")
    p.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unroll"],
                   help="scan (compile time flat in depth), unroll (much faster on CPU) or auto "
                        "(unroll on CPU without a mesh, else scan; the default)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prompt tokens per prefill call; longer prompts go in chunks (default 512 on CPU, 4096 on TPU/GPU)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (pods)")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator HOST:PORT")
    p.add_argument("--num-processes", type=positive_int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def csv_list(text: str) -> tuple[str, ...]:
    """An option's comma-separated names ("attn, experts") as a tuple."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampling options; `check_sampling` (run before anything is loaded) checks their ranges."""
    p.add_argument("--reasoning-effort", default=None, choices=REASONING_EFFORTS,
                   help="think first (high) or not (none); default: the tokenizer's (none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="at most this many tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off (the default)")
    p.add_argument("--min-p", type=float, default=0.0, help="in [0, 1); 0 = off (the default)")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**32) (default 0)")
    p.set_defaults(check=check_sampling)


def check_sampling(args: argparse.Namespace) -> None:
    """ValueError naming the option when a sampling option is out of range (a usage error: exit status 2)."""
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as e:  # "top_k must be ..." -> "--top-k must be ..."
        name, rest = str(e).split(" ", 1)
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")


def add_tool_options(p: argparse.ArgumentParser) -> None:
    """Function calling and JSON output; `read_tool_options` (run before anything is loaded) reads the files."""
    p.add_argument("--tools", default=None, metavar="FILE.json",
                   help="OpenAI-style tool definitions: a JSON list of {'type': 'function', 'function': {...}}")
    p.add_argument("--tool-choice", default="auto", metavar="auto|none|required|NAME",
                   help="auto (the model decides, the default), none (no calls), required (calls only), or a tool's "
                        "name (calls of it); all but auto are enforced by constrained decoding")
    p.add_argument("--json-schema", default=None, metavar="FILE.json|object",
                   help="answer with JSON valid under this schema file ('object': any JSON object or array)")


def read_tool_options(args: argparse.Namespace) -> None:
    """Read --tools / --json-schema and check them with --tool-choice (ValueError naming the file or option);
    sets args.tool_kwargs, the chat keyword arguments (tools, tool_choice, response_format)."""
    from mistral4_jax.serve.chat.grammar import check_response_format
    from mistral4_jax.serve.chat.tools import TOOL_CHOICES, check_tool_choice, check_tools

    def load(path: str) -> Any:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except OSError as e:
            raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None

    tools = None
    if args.tools:
        try:
            tools = check_tools(load(args.tools))
        except ValueError as e:
            raise ValueError(f"--tools {args.tools}: {e}") from None
    choice: Any = args.tool_choice
    if choice not in TOOL_CHOICES:
        choice = {"type": "function", "function": {"name": choice}}
    try:
        choice = check_tool_choice(choice, tools)
    except ValueError as e:
        raise ValueError(f"--tool-choice: {e}") from None
    fmt = None
    if args.json_schema == "object":
        fmt = {"type": "json_object"}
    elif args.json_schema:
        schema = load(args.json_schema)
        try:
            fmt = check_response_format({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        except ValueError as e:
            raise ValueError(f"--json-schema {args.json_schema}: {e}") from None
    args.tool_kwargs = {"tools": tools, "tool_choice": choice, "response_format": fmt}


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
    from mistral4_jax.weights import checkpoint
    from mistral4_jax.sharding import make_mesh

    init_distributed(args)
    dtype = args.dtype
    if dtype is None:
        dtype = checkpoint.read_manifest(args.checkpoint)["dtype"] if checkpoint.is_checkpoint(args.checkpoint) else "float32"
    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.perf_counter()
    model = mistral4_jax.load(args.checkpoint, dtype=dtype, mesh=mesh, layer_loop=args.layer_loop)
    log.info("loaded %s in %.1f s", args.checkpoint, time.perf_counter() - t0)
    if args.prefill_chunk:
        model.prefill_chunk = args.prefill_chunk
    return model


from ..distributed import is_main_process  # noqa: E402  (host 0 alone prints and writes)


# ------------------------------------------------------------------------------------------ plan
def add_plan(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "plan", help="memory per device for weights and KV cache on a mesh (nothing allocated); "
                   "with --compile, compile for a TPU topology or GPUs and report the compiler's figures",
                   epilog="--compile TARGET: a TPU slice (v5e-4, v5e-16, v5e-256, v5p-8, v6e-8, v4-8, or a topology "
                          "such as v5e:2x2) or NxGPU (8xH200, 8xH100). Compiles one decode step and one prefill chunk "
                          "with abstract weights and cache (nothing allocated) and prints per chip the compiler's "
                          "memory against the chip's, collectives, compile time and a roofline. TPU targets need "
                          "`pip install 'mistral4-jax[tpu-aot]'`, GPU targets `pip install 'mistral4-jax[gpu-aot]'`.")
    p.add_argument("--config", required=True,
                   help="a bundled config name (mistral-small-4-119b, small, tiny), a config .json file (ours or "
                        "HF's) or a converted checkpoint directory")
    p.add_argument("--mesh", default=None, help="e.g. expert=8,tensor=2 (default: one device; with --compile, "
                   "experts over up to 8 chips, then tensor=2, the rest data)")
    p.add_argument("--devices", type=positive_int, default=None, help="device count for a -1 axis (default: this machine's)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights (default bfloat16)")
    p.add_argument("--cache-dtype", default=None, choices=sorted(DTYPES),
                   help="KV cache dtype (default bfloat16 for FP8 weights, else the weights')")
    p.add_argument("--context", type=positive_int, default=8192)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--hbm", default=None, type=memory_size, help="memory per device, e.g. 16GiB; prints what fits")
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
    t = p.add_argument_group("training (--train)")
    t.add_argument("--train", action="store_true", help="memory of a training step instead of inference: frozen "
                   "weights, trained arrays, gradients, AdamW state, activations (with --compile: the compiled step)")
    t.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per row (default 4096)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default 1)")
    t.add_argument("--lora-rank", type=int, default=16, help="LoRA rank, 0 = none (default 16)")
    t.add_argument("--lora-targets", type=csv_list, default=("attn",), help="comma-separated LoRA targets (default attn)")
    t.add_argument("--train-params", type=csv_list, default=(), help="comma-separated globs of parameters trained in full")
    t.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing them per layer")
    p.set_defaults(run=run_plan)


def _plan_config(name: str) -> Any:
    """The Mistral4Config of `plan --config`: a bundled config's name, a config file or a converted checkpoint."""
    from mistral4_jax import Mistral4Config, configs
    from mistral4_jax.weights import checkpoint

    path = configs.resolve(name)
    return checkpoint.read_config(path) if checkpoint.is_checkpoint(path) else Mistral4Config.from_json(path)


def run_plan(args: argparse.Namespace) -> int:
    from mistral4_jax.api import resolve_dtype
    from mistral4_jax.plan.memory import format_plan, memory_plan
    from mistral4_jax.sharding import parse_mesh

    if args.train:
        return _run_train_plan(args)
    if args.compile:
        return _run_compile(args)
    cfg = _plan_config(args.config)
    mesh = parse_mesh(args.mesh or "data=1,expert=1,tensor=1", args.devices)
    plan = memory_plan(cfg, mesh, resolve_dtype(args.dtype), resolve_dtype(args.cache_dtype) if args.cache_dtype else None,
                       args.batch, args.context, args.hbm)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def _run_compile(args: argparse.Namespace) -> int:
    from mistral4_jax import configs
    from mistral4_jax.plan.compile import compile_plan, format_compiled

    plan = compile_plan(configs.resolve(args.config), args.compile, mesh=args.mesh, dtype=args.dtype,
                        compute_dtype=args.compute_dtype,
                        cache_dtype=args.cache_dtype, batch=args.batch, context=args.context, chunk=args.chunk,
                        steps=[s.strip() for s in args.steps.split(",") if s.strip()], layers=args.layers,
                        layer_loop=args.layer_loop, cost=not args.no_cost)
    print(json.dumps(plan.to_dict()) if args.json else format_compiled(plan))
    return 0


def _run_train_plan(args: argparse.Namespace) -> int:
    from mistral4_jax.api import resolve_dtype
    from mistral4_jax.plan.train import compile_train_step, format_train_memory, train_memory
    from mistral4_jax.sharding import parse_mesh
    from mistral4_jax.train.step import TrainSpec

    cfg = _plan_config(args.config)
    spec = TrainSpec(lora_rank=args.lora_rank, lora_targets=args.lora_targets, train_params=args.train_params,
                     remat=not args.no_remat)
    dtype, compute = resolve_dtype(args.dtype), resolve_dtype(args.compute_dtype)
    compiled = None
    if args.compile:
        print(f"compiling a train step for {args.compile} (abstract weights, nothing allocated)...", file=sys.stderr,
              flush=True)
        compiled = compile_train_step(cfg, args.compile, args.mesh, dtype, spec, args.batch, args.seq_len,
                                      args.grad_accum, compute)
        mesh = compiled["mesh"]
    else:
        mesh = parse_mesh(args.mesh or "data=1,expert=1,tensor=1", args.devices)
    plan = train_memory(cfg, mesh, dtype, spec, args.batch, args.seq_len, compute)
    plan.compiled = compiled
    print(json.dumps(plan.to_dict()) if args.json else format_train_memory(plan))
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
    p.add_argument("--batch-size", type=positive_int, default=8, help="requests per device batch in --input mode")
    add_tool_options(p)
    p.set_defaults(run=run_generate, check=check_generate)


def check_generate(args: argparse.Namespace) -> None:
    """Usage errors of `generate` (ValueError naming the options), found before anything is loaded."""
    if bool(args.prompt) == bool(args.input):
        raise ValueError("give exactly one of --prompt or --input")
    if args.input and not args.output:
        raise ValueError("--input needs --output")
    if args.output and not args.input:
        raise ValueError("--output goes with --input (with --prompt the answer streams to the terminal)")
    if args.input and (args.image or args.system):
        raise ValueError("--image and --system go with --prompt (with --input, each request carries its messages)")
    check_sampling(args)
    read_tool_options(args)


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
    if args.input:
        requests = read_requests(args)  # a bad file fails here, before the model loads
        return write_results(load_model(args), requests, args)
    model = load_model(args)
    _stream_answer(model, _messages(args, args.prompt), args)
    return 0


def _stream_answer(model: Any, messages: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Stream one answer to stdout (generate --prompt)."""
    from mistral4_jax.serve.chat.grammar import chat_grammar
    from mistral4_jax.serve.chat.session import chat_result
    from mistral4_jax.serve.generate import Request
    from mistral4_jax.serve.sampling import SamplingParams

    tok, kw = model.require_tokenizer(), args.tool_kwargs
    prompt, images = model.encode_chat(messages, reasoning_effort=args.reasoning_effort, tools=kw["tools"],
                                       tool_choice=kw["tool_choice"])  # images: --image files
    grammar = chat_grammar(tok, kw["tools"], kw["tool_choice"], kw["response_format"], args.reasoning_effort)
    request = Request(prompt, args.max_new_tokens, SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p),
                      args.seed, tuple(images), grammar)
    stream = model.generator.stream([request], [tok.eos_id], chunk=8)
    seconds = _print_stream(model, (row for row, in stream))
    result = chat_result(tok, stream.result[0], json_answer=kw["response_format"] is not None)
    _print_calls(result)
    _report(result.completion_tokens, seconds, result.finish_reason)


def _print_calls(result: Any) -> None:
    """The answer's tool calls, one JSON line each on stdout, and its error on stderr (host 0)."""
    if not is_main_process():
        return
    for call in result.tool_calls:
        print(json.dumps({"tool_call": call}, ensure_ascii=False))
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)


def _print_stream(model: Any, chunks: Any) -> float:
    """Write the text of token-id chunks (an iterator of id lists) to stdout as they arrive (host 0);
    returns the seconds it took."""
    decoder = model.require_tokenizer().incremental_decoder(skip_special=False)
    main = is_main_process()
    t0 = time.perf_counter()
    for chunk in chunks:
        text = decoder.feed(chunk)
        if main and text:
            sys.stdout.write(text)
            sys.stdout.flush()
    if main:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
    return time.perf_counter() - t0


def _report(tokens: int, seconds: float, finish: str, extra: str = "") -> None:
    if is_main_process():
        print(f"[{tokens} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s, finish: {finish}{extra}]",
              file=sys.stderr)


MAX_REPORTED = 10
"""Bad --input lines printed one by one before the model loads; the rest are counted."""


def read_requests(args: argparse.Namespace) -> list[Any]:
    """The checked lines of --input (`batch.parse`); each bad line is reported on stderr now.
    ValueError when there is nothing to run (an empty file, or no valid line)."""
    from mistral4_jax.serve import batch

    with open(args.input) as f:
        lines = f.read().splitlines()
    defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed, "reasoning_effort": args.reasoning_effort,
                **{k: v for k, v in args.tool_kwargs.items() if v is not None}}  # --tools etc.: every line's default
    parsed = batch.parse(lines, defaults, source=args.input)
    if not parsed:
        raise ValueError(f"{args.input}: no requests (the file is {'empty' if not lines else 'blank'}): "
                         "expected one JSON chat request per line")
    errors = [p.error for p in parsed if p.error is not None]
    for e in errors[:MAX_REPORTED]:
        print(f"mistral4-jax generate: {e}", file=sys.stderr)
    if len(errors) > MAX_REPORTED:
        print(f"mistral4-jax generate: ... and {len(errors) - MAX_REPORTED} more bad lines", file=sys.stderr)
    if len(errors) == len(parsed):
        raise ValueError(f"{args.input}: none of its {len(parsed)} requests is valid (see above); nothing to run")
    if errors:
        print(f"mistral4-jax generate: {len(errors)} of {len(parsed)} requests are invalid; their results will "
              "carry the error", file=sys.stderr)
    return parsed


def write_results(model: Any, requests: list[Any], args: argparse.Namespace) -> int:
    """Serve the checked requests and write one result per line to --output (host 0 only)."""
    from mistral4_jax.serve import batch

    results = list(batch.serve(model, requests, args.batch_size))
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
                                     "message, /reset clears the history, /exit quits; with --tools, each call the "
                                     "model makes asks for its result)")
    add_model_options(p)
    add_sampling_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_tool_options(p)
    p.set_defaults(run=run_chat, image=[], check=check_chat)


def check_chat(args: argparse.Namespace) -> None:
    check_sampling(args)
    read_tool_options(args)


def run_chat(args: argparse.Namespace) -> int:
    """The conversation is a `ChatSession`: its cache is kept between turns, so a turn prefills only its own
    tokens (the stats line says how many were prefilled and how many came from the cache)."""
    model = load_model(args)
    session = model.chat_session(system=args.system, reasoning_effort=args.reasoning_effort,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, min_p=args.min_p, seed=args.seed, **args.tool_kwargs)
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
            session.reset()
            images = []
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
        message: Any = _user_message(line, images)
        images = []
        while message is not None:  # the answer, then as long as it calls tools: their results and the next answer
            answer = session.stream(message)
            try:
                seconds = _print_stream(model, answer)
            except (ValueError, OSError) as e:  # e.g. an unreadable image: report it, keep the session
                print(f"chat: error: {e}", file=sys.stderr)
                break
            r = answer.result
            _print_calls(r)
            _report(r.completion_tokens, seconds, r.finish_reason, f", prompt {r.prompt_tokens} tokens "
                    f"({r.prompt_tokens - r.cached_tokens} prefilled, {r.cached_tokens} cached)")
            message = _tool_results(r.tool_calls)
    return 0


def _tool_results(calls: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Ask for the result of each call (one line each; the model answers once all are in); None without calls
    or when input ends."""
    results = []
    for call in calls:
        f = call["function"]
        try:
            text = input(f"result of {f['name']}({f['arguments']}) [{call['id']}]> ")
        except EOFError:
            return None
        results.append({"role": "tool", "tool_call_id": call["id"], "content": text})
    return results or None
