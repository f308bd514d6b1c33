"""Chat API and JSONL batch mode on a tiny random model with a real (Tekken v15) tokenizer."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mistral4_jax import Mistral4, batch
from mistral4_jax import model as M
from mistral4_jax.tokenizer import Tokenizer, write_synthetic_tekken
from helpers import TINY

CFG = TINY.replace(vocab_size=131072)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_synthetic_tekken(d / "tekken.json")
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
    for r in (out[0], out[5]):
        assert set(r) == {"id", "reasoning", "content", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert out[0]["completion_tokens"] <= 3 and out[5]["completion_tokens"] <= 5
    again = list(batch.run(model, lines, {"max_new_tokens": 4}, batch_size=8))
    assert again == out  # batch composition does not change results (per-request seeds)


def test_interactive_chat_cli_with_image(tmp_path, monkeypatch, capsys):
    """`mistral4-jax chat`: typed lines become turns; `/image PATH` attaches an image to the next message
    (its [IMG] tokens and pixels reach the generator); a missing file is reported and the session goes on."""
    from mistral4_jax import cli, demo
    from mistral4_jax.generate import Generator

    ckpt = tmp_path / "ckpt"
    demo.write_hf_checkpoint(str(ckpt))
    demo.demo_image().save(tmp_path / "pic.png")
    lines = iter(["Hello", "/image " + str(tmp_path / "missing.png"), "/image " + str(tmp_path / "pic.png"),
                  "What is in the picture?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    stream = Generator.stream

    def spy(self, requests, *a, **k):
        seen.append((list(requests[0].prompt), len(requests[0].images)))
        return stream(self, requests, *a, **k)

    monkeypatch.setattr(Generator, "stream", spy)
    assert cli.main(["chat", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "no such image file" in err and "missing.png" in err
    assert [n for _, n in seen] == [0, 1]
    img_id = 10  # the demo checkpoint's image_token_index
    assert img_id not in seen[0][0] and seen[1][0].count(img_id) > 0
    assert seen[1][0][: len(seen[0][0])] == seen[0][0][: len(seen[0][0])]  # the first turn is kept in the history
