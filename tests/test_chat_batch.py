"""Chat API and JSONL batch mode on a tiny random model with a real (Tekken v15) tokenizer."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mistral4_jax import Mistral4, cli
from mistral4_jax import model as M
from mistral4_jax.cli import demo
from mistral4_jax.serve import batch
from mistral4_jax.serve.chat import ChatSession, Tokenizer
from mistral4_jax.serve.generate import Generator
from helpers import TINY

CFG = TINY.replace(vocab_size=8192)  # the first 8,192 ids of the real vocabulary (write_synthetic_tekken)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    demo.write_synthetic_tekken(d / "tekken.json", vocab_size=CFG.vocab_size)
    m = Mistral4(CFG, M.init_params(CFG, jax.random.key(0)))
    m.tokenizer = Tokenizer.from_dir(d)
    return m


def test_chat_single_and_batch(model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    one = model.chat(msgs, max_new_tokens=6)
    assert one.prompt_tokens == len(model.tokenizer.encode_chat(msgs)) and one.completion_tokens <= 6
    assert one.finish_reason in ("stop", "length")
    tok = model.tokenizer
    if tok.think_ids[0] not in one.token_ids:
        assert one.reasoning == "" and one.content == tok.decode(one.token_ids)
    many = model.chat([msgs, [{"role": "user", "content": "Second"}]], reasoning_effort="high", max_new_tokens=4)
    assert len(many) == 2 and all(r.completion_tokens <= 4 for r in many)
    with pytest.raises(ValueError, match="reasoning_effort"):
        model.chat(msgs, reasoning_effort="medium")
    with pytest.raises(ValueError, match="no tokenizer"):
        Mistral4(CFG, model.params).chat(msgs)


def test_jsonl_batch_keeps_order_ids_and_reports_bad_lines(model):
    lines = [
        json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}),
        "{not json",
        json.dumps({"id": "c", "messages": []}),
        json.dumps({"id": "d", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "ultra"}),
        json.dumps({"id": "e", "messages": [{"role": "user", "content": "x"}], "temperature": -1}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "Bonjour"}], "temperature": 0.8, "seed": 3, "max_tokens": 5}),
        json.dumps({"id": "g", "messages": [{"role": "user", "content": "Hello"}], "bogus": 1}),
    ]
    out = list(batch.run(model, lines, {"max_new_tokens": 4}, batch_size=2))
    assert [r["id"] for r in out] == ["a", "2", "c", "d", "e", "7", "g"]  # default ids take the type of the others
    assert "not valid JSON" in out[1]["error"]
    assert "messages" in out[2]["error"]
    assert "reasoning_effort" in out[3]["error"]
    assert "temperature" in out[4]["error"]
    assert "unknown field 'bogus'" in out[6]["error"]
    for r, line in ((out[0], lines[0]), (out[5], lines[6])):
        assert set(r) == {"id", "reasoning", "content", "tool_calls", "prompt_tokens", "completion_tokens", "finish_reason"}
        # the same request through model.generate: the row reports its tokens and why they ended
        req = json.loads(line)
        prompt = model.tokenizer.encode_chat(req["messages"])
        g, = model.generate([prompt], max_new_tokens=req["max_tokens"], temperature=req.get("temperature", 0.0),
                            seed=req.get("seed", 0), stop_token_ids=[model.tokenizer.eos_id])
        assert (r["prompt_tokens"], r["completion_tokens"], r["finish_reason"]) == (len(prompt), len(g.tokens), g.finish_reason)
        assert r["finish_reason"] == ("length" if r["completion_tokens"] == req["max_tokens"] else "stop")
    again = list(batch.run(model, lines, {"max_new_tokens": 4}, batch_size=8))
    assert again == out  # batch composition does not change results (per-request seeds)


def test_jsonl_batch_refuses_requests_alone(model, monkeypatch):
    """A request past the model's window, and one whose cache alone does not fit the device memory, fail alone;
    a batch whose cache does not fit together is retried smaller. With 9,216 bytes free per device
    (MISTRAL4_JAX_DEVICE_MEMORY) and 192 bytes per slot and row (2 layers x (16 + 8) float32), one row of up
    to 48 slots fits, two rows of 32 do not, nor one of the 128+ slots of 100 new tokens. The others equal
    their results run alone."""
    hello, bonjour = [{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Bonjour"}]
    assert max(len(model.tokenizer.encode_chat(m)) for m in (hello, bonjour)) <= 32  # 32 + 16 slots at most
    lines = [json.dumps({"id": "a", "messages": hello, "max_tokens": 3}),
             json.dumps({"id": "long", "messages": hello, "max_tokens": CFG.max_position_embeddings}),
             json.dumps({"id": "big", "messages": bonjour, "max_tokens": 100}),
             json.dumps({"id": "c", "messages": bonjour, "temperature": 0.8, "seed": 3, "max_tokens": 5})]
    alone = [next(batch.run(model, [line], batch_size=1)) for line in (lines[0], lines[3])]
    monkeypatch.setenv("MISTRAL4_JAX_DEVICE_MEMORY", str(192 * 48))
    out = list(batch.run(model, lines, batch_size=8))
    assert [r["id"] for r in out] == ["a", "long", "big", "c"]
    assert [out[0], out[3]] == alone and "error" not in alone[0] and "error" not in alone[1]
    assert out[1]["error"] == (f"line 2: prompt ({len(model.tokenizer.encode_chat(hello))} tokens) + max_new_tokens "
                               f"({CFG.max_position_embeddings}) exceeds the model's window (max_position_embeddings "
                               f"{CFG.max_position_embeddings})")
    assert out[2]["error"].startswith("line 3: a ") and "-slot cache for 1 row needs" in out[2]["error"]
    assert "9.0 KiB free on MISTRAL4_JAX_DEVICE_MEMORY" in out[2]["error"]


def test_interactive_chat_cli_with_image(tmp_path, monkeypatch, capsys):
    """`mistral4-jax chat`: typed lines become turns of one chat session (a later turn reuses the cache of
    the earlier ones); `/image PATH` attaches an image to the next message: its `[IMG]` tokens get the image's
    features in the chunk prefill, and the answer equals a fresh `model.chat` of the same conversation; a
    missing file is reported and the session goes on; each new shape's compilation is announced once."""
    ckpt = tmp_path / "ckpt"
    demo.write_hf_checkpoint(str(ckpt))
    demo.demo_image().save(tmp_path / "pic.png")
    lines = iter(["Hello", "/image " + str(tmp_path / "missing.png"), "/image " + str(tmp_path / "pic.png"),
                  "What is in the picture?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sessions, chunks, streams = [], [], []
    init, extend, stream = ChatSession.__init__, Generator.extend, ChatSession.stream

    def spy_init(self, *a, **k):
        init(self, *a, **k, prefill_chunk=16)  # the image's [IMG] tokens span several chunks
        sessions.append(self)

    def spy_extend(self, cache, ids, n, index, tokens, settings, feats=None, allowed=None):
        chunks.append((ids[0, :n].tolist(), None if feats is None else np.asarray(feats)))
        return extend(self, cache, ids, n, index, tokens, settings, feats, allowed)

    def spy_stream(self, *a, **k):
        streams.append(stream(self, *a, **k))
        return streams[-1]

    monkeypatch.setattr(ChatSession, "__init__", spy_init)
    monkeypatch.setattr(ChatSession, "stream", spy_stream)
    monkeypatch.setattr(Generator, "extend", spy_extend)
    assert cli.main(["chat", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "no such image file" in err and "missing.png" in err
    assert err.count("compiling decode loop for batch 1 x 16 new tokens, 256-slot cache") == 1
    assert "prefilled" in err and "cached" in err
    (session,) = sessions
    model, last = session.model, streams[-1].result
    img_id = model.vision_config.image_token_index
    ids = model.encode_chat(session.messages[:-1])[0]
    assert last.prompt_tokens == len(ids) and 0 < last.cached_tokens < ids.index(img_id)  # turn 1 came from the cache
    with_image = [(part.count(img_id), f) for part, f in chunks if img_id in part]
    assert len(with_image) > 1 and all(f is not None and not f[k:].any() for k, f in with_image)
    (image,) = model.encode_chat(session.messages[:-1])[1]
    np.testing.assert_allclose(np.concatenate([f[:k] for k, f in with_image]), model.image_features([image]), atol=1e-6)
    assert model.chat(session.messages[:-1], max_new_tokens=3).token_ids == last.token_ids
