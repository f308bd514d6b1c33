"""The OpenAI-compatible server (`mistral4-jax serve`): `create_app` builds the FastAPI app over a
continuous-batching engine, `serve` runs it with uvicorn (on a pod: process 0 serves HTTP, every process runs
the engine's steps)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import jax

from ..serve.engine import Engine, HostSync
from .app import create_app

log = logging.getLogger(__name__)


def serve(model: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000, rows: int = 8,
          max_context: int | None = None, steps_per_call: int = 8, max_queue: int = 256,
          request_timeout: float | None = None, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve `model` over HTTP until SIGINT/SIGTERM (then: stop taking requests, let those in flight finish for up to
    `shutdown_timeout` seconds, cancel the rest). On a multi-host system every process calls this: process 0 runs
    the HTTP server, the others follow its engine step by step (`serve.engine.HostSync`)."""
    import uvicorn

    multi = jax.process_count() > 1
    tok = model.tokenizer
    stops = [tok.eos_id] if tok is not None else None
    engine = Engine(model, rows=rows, max_context=max_context, steps_per_call=steps_per_call, max_queue=max_queue,
                    stop_token_ids=stops, sync=HostSync(model) if multi else None)
    print(f"mistral4-jax serve: {rows} decode rows x {engine.slots:,}-slot cache (max context {engine.max_context:,}); "
          "compiling the first programs", file=sys.stderr, flush=True)
    engine.warmup()
    if jax.process_index() != 0:  # follow process 0's steps until it shuts down
        engine.serve_forever()
        return
    app = create_app(model, engine, model_name, request_timeout=request_timeout, shutdown_timeout=shutdown_timeout,
                     warmup=False)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    _server_class(f"mistral4-jax serve: {model_name} on http://{host}:{port}/v1")(config).run()


def _server_class(ready: str) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that prints `ready` once it listens, and after a signal-triggered drain returns from
        `run` (exit status 0) instead of raising the signal again: the requests in flight were answered."""

        async def startup(self, *args: Any, **kwargs: Any) -> None:
            await super().startup(*args, **kwargs)
            if self.started:
                print(ready, file=sys.stderr, flush=True)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Server


__all__ = ["create_app", "serve"]
