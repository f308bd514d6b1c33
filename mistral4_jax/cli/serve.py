"""`mistral4-jax serve`: the OpenAI-compatible HTTP server (`mistral4_jax.server`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .commands import add_model_options, load_model, positive_int


def add_serve(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "serve", help="serve the model over an OpenAI-compatible HTTP API (continuous batching)",
                   description="POST /v1/chat/completions and /v1/completions, GET /v1/models, /health and /metrics. "
                               "Binds to 127.0.0.1 unless --host says otherwise.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="decode rows: requests generating at once (default 8)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="longest prompt + max_tokens of a request (default: max_position_embeddings, at most 4096)")
    p.add_argument("--steps-per-call", type=positive_int, default=8, help="decode steps per device call (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests that may wait for a row; more are answered 429 (default 256)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds a request may take (default: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: the checkpoint's "
                                                             "directory name)")
    p.set_defaults(run=run_serve, check=check_serve)


def check_serve(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for name in ("request_timeout", "shutdown_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")


def run_serve(args: argparse.Namespace) -> int:
    from mistral4_jax.server import serve

    model = load_model(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    serve(model, name, host=args.host, port=args.port, rows=args.max_batch, max_context=args.max_context,
          steps_per_call=args.steps_per_call, max_queue=args.max_queue, request_timeout=args.request_timeout,
          shutdown_timeout=args.shutdown_timeout, log_level="debug" if args.verbose else "warning")
    return 0
