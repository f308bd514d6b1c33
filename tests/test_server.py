"""The OpenAI-compatible server, started for real on 127.0.0.1 (a free port) and spoken to with the official
`openai` client: a tiny random model with a small vision tower and a Tekken v15 tokenizer (the first 8,192 ids of
the real vocabulary). Greedy answers must equal offline `model.chat` / `model.generate`: text, reasoning, an image,
required tool calls, completions from text and from token ids, streamed and not. Then a bounded load test (64
concurrent streams of mixed lengths: none lost, duplicated or mixed up; 10 cancelled mid-stream free their rows),
bad requests (400 with OpenAI's error body, the server keeps serving), a full queue (429), metrics and health."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from mistral4_jax import Mistral4
from mistral4_jax import model as M
from mistral4_jax.cli.demo import write_synthetic_tekken
from mistral4_jax.model import vision as V
from mistral4_jax.model.vision_config import VisionConfig
from mistral4_jax.serve.chat import Tokenizer
from mistral4_jax.serve.engine import Engine
from mistral4_jax.server import create_app
from mistral4_jax.server.protocol import ChatDeltas, StopStrings
from helpers import TINY

CFG = TINY.replace(vocab_size=8192)
VISION = VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, patch_size=4,
                      image_size=64, spatial_merge_size=2, text_hidden_size=CFG.hidden_size)
IMAGE_CFG = {"image_patch_size": 4, "max_image_size": 64, "spatial_merge_size": 2}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 12}},
                                               "required": ["city"], "additionalProperties": False}}}]


class Server:
    """A uvicorn server on a thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_synthetic_tekken(d / "tekken.json", image=IMAGE_CFG, vocab_size=CFG.vocab_size)
    m = Mistral4(CFG, M.init_params(CFG, jax.random.key(0)), vision_config=VISION,
                 vision_params=V.init_params(VISION, jax.random.key(1)))
    m.tokenizer = Tokenizer.from_dir(d)
    m.verbose = False
    return m


@pytest.fixture(scope="module")
def server(model):
    engine = Engine(model, rows=4, max_context=256, steps_per_call=4, max_queue=128,
                    stop_token_ids=[model.tokenizer.eos_id])
    s = Server(create_app(model, engine, "tiny"))
    s.engine = engine
    yield s
    s.stop()
    assert engine.closing and not engine.busy


def _png(seed: int, h: int, w: int) -> str:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _stream_text(chunks) -> tuple[str, str, str, list]:
    content, reasoning, finish, calls = "", "", None, []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or ""
        calls += d.tool_calls or []
        finish = c.choices[0].finish_reason or finish
    return content, reasoning, finish, calls


@pytest.mark.parametrize("effort", ["none", "high"])
def test_chat_equals_offline(server, model, effort):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ref = model.chat(msgs, max_new_tokens=12, reasoning_effort=effort)
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                              reasoning_effort=effort)
    m = r.choices[0].message
    assert (m.content, getattr(m, "reasoning_content", None) or "") == (ref.content, ref.reasoning)
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                        reasoning_effort=effort, stream=True,
                                                        stream_options={"include_usage": True}))
    assert _stream_text(chunks)[:3] == (ref.content, ref.reasoning, ref.finish_reason)
    assert chunks[-1].usage.completion_tokens == ref.completion_tokens


def test_image_and_tools_equal_offline(server, model):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in it?"},
                                         {"type": "image_url", "image_url": {"url": _png(0, 12, 20)}}]}]
    ref = model.chat(msgs, max_new_tokens=8)
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ref.content and r.usage.prompt_tokens == ref.prompt_tokens

    ask = [{"role": "user", "content": "Weather in Paris?"}]
    ref = model.chat(ask, max_new_tokens=40, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert ref.tool_calls, "the grammar forces a call"
    r = server.client.chat.completions.create(model="tiny", messages=ask, max_tokens=40, temperature=0, tools=TOOLS,
                                              tool_choice="required", parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in ref.tool_calls]
    assert r.choices[0].finish_reason == "tool_calls"
    streamed = _stream_text(server.client.chat.completions.create(
        model="tiny", messages=ask, max_tokens=40, temperature=0, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, stream=True))
    assert [(c.function.name, c.function.arguments) for c in streamed[3]] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in ref.tool_calls]
    assert streamed[2] == "tool_calls"


def test_completions_text_ids_and_stop(server, model):
    tok = model.tokenizer
    ids = [1, 5, 900, 77, 4000]
    ref = model.generate([ids], max_new_tokens=10, stop_token_ids=[tok.eos_id])[0]
    r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == tok.decode(ref.tokens) and r.usage.completion_tokens == len(ref.tokens)
    streamed = server.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == tok.decode(ref.tokens)
    text_ref = model.generate([tok.encode("Once upon", bos=True)], max_new_tokens=6, stop_token_ids=[tok.eos_id])[0]
    r = server.client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert r.choices[0].text == tok.decode(text_ref.tokens)
    full = tok.decode(ref.tokens)  # a stop string cuts the text there (and ends the request)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if stop.strip():
        r = server.client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, stop=[stop])
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_load_cancel_and_reuse(server, model):
    """64 concurrent streams (8 prompts x 8 budgets): each gets exactly its own greedy tokens; then 10 streams
    cancelled after their first chunk free their rows, and the server still answers."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1000, 8000, int(n)).tolist() for n in rng.integers(3, 30, 8)]
    refs = model.generate(prompts, max_new_tokens=24, stop_token_ids=[model.tokenizer.eos_id])
    jobs = [(i % 8, 1 + (i * 7) % 24) for i in range(64)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(p: int, n: int) -> tuple[str, str]:
        stream = await client.completions.create(model="tiny", prompt=prompts[p], max_tokens=n, temperature=0,
                                                 stream=True)
        text, finish = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
                finish = c.choices[0].finish_reason or finish
        return text, finish

    async def cancelled() -> None:
        stream = await client.completions.create(model="tiny", prompt=prompts[0], max_tokens=200, temperature=0,
                                                 stream=True)
        async for _ in stream:
            break
        await stream.close()

    async def main():
        results = await asyncio.gather(*(one(p, n) for p, n in jobs))
        await asyncio.gather(*(cancelled() for _ in range(10)))
        return results

    before = dict(server.engine.stats.finished)
    results = asyncio.run(main())
    for (p, n), (text, finish) in zip(jobs, results):
        want = refs[p].tokens[:n]
        assert text == model.tokenizer.decode(want), (p, n)
        assert finish == ("length" if len(want) == n else "stop")
    deadline = time.monotonic() + 30
    while server.engine.stats.finished["cancelled"] - before.get("cancelled", 0) < 10:
        assert time.monotonic() < deadline, server.engine.stats
        time.sleep(0.05)
    assert not server.engine.live.any()
    r = server.client.completions.create(model="tiny", prompt=prompts[1], max_tokens=5, temperature=0)
    assert r.choices[0].text == model.tokenizer.decode(refs[1].tokens[:5])
    assert server.engine.stats.compactions > 0  # the write slot came round the 320-slot cache


def test_bad_requests_get_400_and_the_server_keeps_serving(server, model):
    post = lambda body, path="/v1/chat/completions": httpx.post(server.url + path, timeout=60,
                                                                **({"content": body} if isinstance(body, bytes)
                                                                   else {"json": body}))
    msgs = [{"role": "user", "content": "Hi"}]
    cases = {b"{not json": "not valid JSON",
             b"[1, 2]": "must be a JSON object",
             json.dumps({"model": "tiny", "messages": msgs, "max_tokens": "many"}).encode(): "max_tokens",
             json.dumps({"model": "tiny", "messages": "Hi"}).encode(): "messages",
             json.dumps({"model": "tiny", "messages": msgs, "max_tokens": 0}).encode(): "max_tokens must be ≥ 1",
             json.dumps({"model": "tiny", "messages": msgs, "max_tokens": 5000}).encode(): "exceeds the context",
             json.dumps({"model": "gpt-4", "messages": msgs}).encode(): "not served here",
             json.dumps({"model": "tiny", "messages": msgs, "n": 2}).encode(): "n=2 is not supported",
             json.dumps({"model": "tiny", "messages": msgs, "temperature": -1}).encode(): "temperature",
             json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(): "role",
             json.dumps({"model": "tiny", "messages": msgs, "tools": TOOLS, "tool_choice": {
                 "type": "function", "function": {"name": "nope"}}}).encode(): "nope"}
    for body, words in cases.items():
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error", (body, err)
    r = post({"model": "tiny", "prompt": [1, 99999], "max_tokens": 2}, "/v1/completions")
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="not served here"):
        server.client.chat.completions.create(model="other", messages=msgs)

    text_only = Mistral4(CFG, model.params)  # shares the weights; nothing is compiled for a refused request
    text_only.tokenizer, text_only.verbose = model.tokenizer, False
    other = Server(create_app(text_only, Engine(text_only, rows=1, max_context=64), "text", warmup=False))
    try:
        img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(1, 8, 8)}}]}]
        r = httpx.post(other.url + "/v1/chat/completions", json={"model": "text", "messages": img}, timeout=60)
        assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"]
    finally:
        other.stop()
    assert server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0).choices


def test_full_queue_answers_429(model):
    engine = Engine(model, rows=1, max_context=64, max_queue=1)
    engine.start = lambda: None  # never runs: the first request stays queued, and the queue is full
    s = Server(create_app(model, engine, "tiny", warmup=False))
    try:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}
        waiting = threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, httpx.post, s.url + "/v1/completions",
                                                                json=body, timeout=3), daemon=True)
        waiting.start()
        deadline = time.monotonic() + 30
        while engine._inbox.qsize() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        waiting.join(30)
    finally:
        engine._closing = True
        s.stop()


def test_metrics_and_health(server):
    server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["mistral4_generation_tokens_total"] == server.engine.stats.generated_tokens > 0
    assert values['mistral4_requests_finished_total{reason="length"}'] >= 1
    for name in ("mistral4_tokens_per_second", "mistral4_queue_length", "mistral4_batch_occupancy",
                 "mistral4_time_to_first_token_seconds_count"):
        assert name in values, name
    assert values['mistral4_http_requests_total{route="/v1/chat/completions",status="200"}'] >= 1


def test_chat_deltas_split_reasoning_content_and_calls(model):
    """The stream's field split on an answer as mistral-common writes one (reasoning, text, a call)."""
    tok = model.tokenizer
    think, end = tok.think_ids
    calls = tok.token_id("[TOOL_CALLS]")
    ids = [think, *tok.encode("Let me think."), end, *tok.encode("Sure."), calls, *tok.encode("f")]
    deltas = ChatDeltas(tok, [])
    pieces = [p for t in ids for p in deltas.feed([t])] + deltas.feed([], final=True)
    joined = {f: "".join(t for g, t in pieces if g == f) for f in ("reasoning_content", "content")}
    assert joined == {"reasoning_content": "Let me think.", "content": "Sure."}
    cut = StopStrings(["END"])
    shown = cut.feed("abcE") + cut.feed("NDxyz") + cut.feed("more", final=True)
    assert shown == "abc" and cut.hit


def test_cli_serve_drains_on_sigterm(tmp_path):
    """`mistral4-jax serve` as users start it (a subprocess, the demo checkpoint): it announces the compile and its
    URL, serves, and on SIGTERM stops taking requests but lets the one in flight finish, then exits 0."""
    import os
    import signal
    import subprocess
    import sys

    from mistral4_jax.cli import demo

    demo.write_hf_checkpoint(str(tmp_path / "ckpt"), with_vision=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mistral4_jax.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"),
                             "--port", str(port), "--max-batch", "2", "--max-context", "96", "--steps-per-call", "2",
                             "--shutdown-timeout", "60"], stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        lines = []
        for line in proc.stderr:  # the server prints its URL once it listens (after the warm-up compile)
            lines.append(line)
            if f"http://127.0.0.1:{port}/v1" in line:
                break
        assert any("compiling" in x for x in lines), lines
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["ckpt"]
        stream = client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=48, temperature=0, stream=True)
        chunks = [next(stream), next(stream)]  # the role, then the first tokens: the request is in flight
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert proc.wait(timeout=90) == 0, proc.stderr.read()[-2000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
