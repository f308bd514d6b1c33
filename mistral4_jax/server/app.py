"""The OpenAI-compatible HTTP server: FastAPI routes over a continuous-batching `serve.engine.Engine`.

    POST /v1/chat/completions   messages (text, images, tools), reasoning_effort, sampling, stop, seed, stream
    POST /v1/completions        a text prompt or token ids
    GET  /v1/models             the served model
    GET  /health                200 while serving, 503 while shutting down
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, queue length, batch occupancy, TTFT

The engine runs on its own thread; a request is encoded (mistral-common, images, its grammar) on a worker
thread, submitted, and its tokens come back to the event loop as they are generated. A client that goes away
cancels its request (its decode row is free at the next engine step). Bad requests get HTTP 400 with OpenAI's
error body and touch nothing else; a full queue answers 429, a server shutting down 503, a request past its
timeout 408 (or, once streaming, an error event).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ValidationError

from ..serve.chat.grammar import chat_grammar, check_response_format
from ..serve.chat.session import chat_result
from ..serve.engine import Engine, Job, QueueFull, ShuttingDown
from ..serve.generate import Generation, Request
from ..serve.sampling import SamplingParams
from .protocol import (APIError, ChatCompletionRequest, ChatDeltas, CompletionRequest, TextDeltas, chat_chunk,
                       completion_chunk, new_id, now, usage)


class EngineMetrics:
    """A Prometheus collector reading the engine's counters at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        e, s = self.engine, self.engine.stats
        done = CounterMetricFamily("mistral4_requests_finished", "Requests ended, by finish reason", labels=["reason"])
        for reason, n in sorted(s.finished.items()):
            done.add_metric([reason], n)
        yield done
        yield CounterMetricFamily("mistral4_prompt_tokens", "Prompt tokens prefilled", value=s.prompt_tokens)
        yield CounterMetricFamily("mistral4_generation_tokens", "Tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("mistral4_decode_steps", "Decode steps run", value=s.decode_steps)
        yield GaugeMetricFamily("mistral4_tokens_per_second", "Tokens generated per second over the last 10 s",
                                value=s.tokens_per_second())
        yield GaugeMetricFamily("mistral4_queue_length", "Requests waiting for a decode row", value=s.waiting)
        yield GaugeMetricFamily("mistral4_batch_occupancy", "Share of the decode rows in use",
                                value=s.live_rows / e.rows)
        yield GaugeMetricFamily("mistral4_decode_rows", "Decode rows of the engine", value=e.rows)


def create_app(model: Any, engine: Engine, model_name: str, request_timeout: float | None = None,
               shutdown_timeout: float = 30.0, warmup: bool = True) -> FastAPI:
    """The FastAPI app serving `model` as `model_name` through `engine` (started with the app, shut down with it:
    in-flight requests get up to `shutdown_timeout` seconds). request_timeout: seconds a request may take."""
    registry = CollectorRegistry()
    registry.register(EngineMetrics(engine))
    http_requests = Counter("mistral4_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    ttft = Histogram("mistral4_time_to_first_token_seconds", "Seconds from a request's arrival to its first token",
                     registry=registry, buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
    tok = model.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warmup:  # compile the first prompt bucket and the decode step before taking requests
            await run_in_threadpool(engine.run, [Request([model.config.bos_token_id or 1], 2)])
        engine.start()
        yield
        await run_in_threadpool(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="mistral4-jax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    app.add_middleware(CountRequests, counter=http_requests)

    async def parse(request: HTTPRequest, kind: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            body = kind.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise APIError(400, f"{field}: {err['msg']} (got {json.dumps(err.get('input'), default=str)[:200]})",
                           field) from None
        if body.model != model_name:
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {model_name!r}", "model",
                           "model_not_found")
        body.unsupported()
        return body

    def sampling(body: Any, prompt: list[int], images: list[Any] = (), grammar: Any = None) -> Request:
        max_new = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_new is not None and max_new <= 0:
            raise APIError(400, f"max_tokens must be ≥ 1, got {max_new}", "max_tokens")
        if max_new is None:
            max_new = max(1, engine.max_context - len(prompt))
        seed = body.seed if body.seed is not None else random.getrandbits(32)
        r = Request(prompt, max_new, SamplingParams(body.temperature, body.top_k, body.top_p, body.min_p), seed,
                    tuple(images), grammar)
        try:
            engine.check(r)
        except ValueError as e:
            raise APIError(400, str(e), "max_tokens" if "max_tokens" in str(e) else "messages") from None
        return r

    def chat_request(body: ChatCompletionRequest) -> Request:
        t = model.require_tokenizer()
        try:
            ids, images = model.encode_chat(body.messages, reasoning_effort=body.reasoning_effort, tools=body.tools,
                                            tool_choice=body.tool_choice)
            grammar = chat_grammar(t, body.tools, body.tool_choice, body.response_format, body.reasoning_effort,
                                   body.parallel_tool_calls)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        return sampling(body, ids, images, grammar)

    def completion_request(body: CompletionRequest) -> Request:
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"one prompt per request ({len(p)} given)", "prompt")
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise APIError(400, "the prompt is empty", "prompt")
            p = model.require_tokenizer().encode(p, bos=True)
        return sampling(body, list(p))

    async def run(request: Request, http: HTTPRequest) -> AsyncIterator[list[int] | Generation]:
        """The request's new tokens as they come, then its `Generation`; cancelled if the client goes away."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        arrived = time.monotonic()
        try:
            job: Job = engine.submit(request, on_tokens=lambda t: loop.call_soon_threadsafe(q.put_nowait, t),
                                     on_done=lambda g: loop.call_soon_threadsafe(q.put_nowait, g),
                                     timeout=request_timeout)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full", kind="rate_limit_error") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down", kind="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        first = True
        try:
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), 1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if first and isinstance(item, list):
                    ttft.observe(time.monotonic() - arrived)
                    first = False
                yield item
                if isinstance(item, Generation):
                    return
        finally:
            if job.result is None:
                engine.cancel(job)

    def failed(g: Generation) -> APIError | None:
        if g.finish_reason == "timeout":
            return APIError(408, g.error or "the request timed out", code="timeout", kind="timeout_error")
        return None

    async def pieces(request: Request, http: HTTPRequest, deltas: Any) -> AsyncIterator[tuple[str, str] | Generation]:
        """The answer's text pieces (field, text) as they come (`ChatDeltas` / `TextDeltas`), then its `Generation`
        (finish "stop" once a stop string is reached: the rest is cancelled)."""
        gen, tokens = run(request, http), []
        async for item in gen:
            if isinstance(item, Generation):
                for piece in deltas.feed([], final=True):
                    yield piece
                yield item
                return
            tokens.extend(item)
            for piece in deltas.feed(item):
                yield piece
            if deltas.stop.hit:
                await gen.aclose()
                yield Generation(tokens, "stop", len(request.prompt))
                return

    async def answer(request: Request, http: HTTPRequest, deltas: Any, stream: bool,
                     last: Any, chunk: Any, include_usage: bool) -> Response:
        """The JSON answer, or the event stream: `chunk(delta, finish)` builds a stream chunk from {field: text};
        `last(generation, texts)` -> (the answer's final {field: value}, finish reason, usage)."""
        it = pieces(request, http, deltas)
        if not stream:
            texts: dict[str, str] = collections.defaultdict(str)
            async for item in it:
                if isinstance(item, Generation):
                    if (err := failed(item)) is not None:
                        raise err
                    return JSONResponse(last(item, texts, full=True))
                texts[item[0]] += item[1]
            return Response(status_code=499)  # the client went away
        first = await it.__anext__()  # a refused submission is still a plain HTTP error here

        async def events() -> AsyncIterator[str]:
            texts: dict[str, str] = collections.defaultdict(str)
            item = first
            while True:
                if isinstance(item, Generation):
                    break
                texts[item[0]] += item[1]
                yield sse(chunk({item[0]: item[1]}, None))
                item = await it.__anext__()
            if (err := failed(item)) is not None:
                yield sse(err.body())
            else:
                delta, finish, use = last(item, texts, full=False)
                yield sse(chunk(delta, finish))
                if include_usage:
                    yield sse({**chunk({}, None), "choices": [], "usage": use})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Any:
        body: ChatCompletionRequest = await parse(http, ChatCompletionRequest)
        deltas = ChatDeltas(tok, body.stop_strings()) if tok is not None else None
        request = await run_in_threadpool(chat_request, body)
        json_answer = check_response_format(body.response_format) is not None
        rid, created = new_id("chatcmpl"), now()

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return chat_chunk(rid, created, model_name, delta, finish)

        def last(g: Generation, texts: dict[str, str], full: bool) -> Any:
            r = chat_result(tok, g, json_answer=json_answer)
            if deltas.stop.hit:
                r.content, r.finish_reason = texts["content"], "stop"
            use = usage(r.prompt_tokens, r.completion_tokens)
            if not full:  # the stream's last chunk: the calls, parsed
                calls = [{"index": i, **c} for i, c in enumerate(r.tool_calls)]
                return ({"tool_calls": calls} if calls else {}), r.finish_reason, use
            message = {"role": "assistant", "content": r.content if r.content or not r.tool_calls else None,
                       "reasoning_content": r.reasoning or None}
            if r.tool_calls:
                message["tool_calls"] = r.tool_calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish_reason}
            if r.error:
                choice["error"] = r.error
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": use}

        response = await answer(request, http, deltas, body.stream, last, chunk,
                                body.stream_options is not None and body.stream_options.include_usage)
        if body.stream:  # a first chunk with the role, as OpenAI's streams begin
            response.body_iterator = _prepend(sse(chunk({"role": "assistant", "content": ""}, None)),
                                              response.body_iterator)
        return response

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        body: CompletionRequest = await parse(http, CompletionRequest)
        if tok is None and body.stream:
            raise APIError(400, "streaming needs a tokenizer; this checkpoint has none", "stream")
        deltas = TextDeltas(tok, body.stop_strings())
        request = await run_in_threadpool(completion_request, body)
        rid, created = new_id("cmpl"), now()
        echo = tok.decode(request.prompt) if body.echo and tok is not None else ""

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return completion_chunk(rid, created, model_name, delta.get("text", ""), finish)

        def last(g: Generation, texts: dict[str, str], full: bool) -> Any:
            finish = "stop" if g.finish_reason == "cancelled" else g.finish_reason
            use = usage(g.prompt_tokens, len(g.tokens))
            if not full:
                return {}, finish, use
            choice = {"index": 0, "text": echo + texts["text"], "logprobs": None, "finish_reason": finish}
            if tok is None:
                choice["token_ids"] = g.tokens
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [choice], "usage": use}

        response = await answer(request, http, deltas, body.stream, last, chunk,
                                body.stream_options is not None and body.stream_options.include_usage)
        if body.stream and echo:
            response.body_iterator = _prepend(sse(chunk({"text": echo}, None)), response.body_iterator)
        return response

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "mistral4-jax", "max_model_len": engine.max_context}]}

    @app.get("/health")
    async def health() -> Any:
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "decode_rows": engine.rows, "live_rows": engine.stats.live_rows,
                "waiting": engine.stats.waiting}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class CountRequests:
    """ASGI middleware counting HTTP requests by path and status (a plain ASGI wrapper: Starlette's
    `BaseHTTPMiddleware` would hide a client's disconnect from the handlers)."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, sending)


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for x in rest:
        yield x


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
