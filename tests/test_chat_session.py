"""Multi-turn chat sessions: the cache is kept between turns, a turn prefills only its new tokens without
compiling anything, and its answer equals a fresh `model.chat` and transformers' greedy generation on the
same ids; cache growth, the fallback when the history re-encodes differently, and compile notices."""

from __future__ import annotations

import jax
import pytest
from jax._src import dispatch

import mistral4_jax
from mistral4_jax.serve.chat.session import common_prefix
from mistral4_jax.cli.demo import write_synthetic_tekken
from helpers import TINY, hf_greedy_batch, make_hf_model, save_hf

CFG = TINY.replace(vocab_size=131072)  # the real Tekken vocabulary
COMPILED: list[str] = []  # names of every program XLA compiles from here on
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: COMPILED.append(kw.get("fun_name", "?")) if event == dispatch.BACKEND_COMPILE_EVENT else None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("session")
    hf = make_hf_model(CFG, seed=5)
    save_hf(hf, str(d))
    write_synthetic_tekken(d)
    return hf, mistral4_jax.load(d)


def count_prefill(monkeypatch, gen) -> list[int]:
    """Record the real tokens of every chunk the session prefills."""
    counts: list[int] = []
    extend = gen.extend

    def spy(cache, ids, n, *a):
        counts.append(n)
        return extend(cache, ids, n, *a)

    monkeypatch.setattr(gen, "extend", spy)
    return counts


def hf_answer(hf, ids, new, eos):
    """transformers' greedy tokens for prompt ids, cut at eos as our answers are."""
    out = hf_greedy_batch(hf, [ids], new, eos, CFG.pad_token_id)[0]
    return out[: out.index(eos)] if eos in out else out


def test_second_turn_prefills_only_its_tokens_and_compiles_nothing(pair, monkeypatch, capsys):
    hf, model = pair
    tok = model.tokenizer
    chat = model.chat_session(system="Be brief.", max_new_tokens=5, prefill_chunk=16, min_cache=64)
    prefilled = count_prefill(monkeypatch, model.generator)
    first = chat.send("Hi there")
    ids1 = tok.encode_chat(chat.messages[:2])
    assert (first.prompt_tokens, first.cached_tokens, sum(prefilled)) == (len(ids1), 0, len(ids1))
    assert len(prefilled) == 2  # 22 tokens in chunks of 16
    err = capsys.readouterr().err
    assert err.count("compiling chat prefill for 16-token chunks, 64-slot cache, 16 new tokens") == 1
    assert err.count("compiling decode loop for batch 1 x 16 new tokens, 64-slot cache") == 1

    compiled, ours, prefilled[:] = len(COMPILED), model.generator.compiles, []
    second = chat.send("How are you?")
    assert COMPILED[compiled:] == [] and model.generator.compiles == ours
    assert "compiling" not in capsys.readouterr().err
    ids2 = tok.encode_chat(chat.messages[:4])
    fed = first.token_ids if first.finish_reason == "stop" else first.token_ids[:-1]  # the last one is not fed back
    assert ids2[: len(ids1) + len(fed)] == ids1 + fed  # the answer re-encodes to the same ids
    assert second.cached_tokens == len(ids1) + len(fed)
    assert prefilled == [len(ids2) - second.cached_tokens] and second.prompt_tokens == len(ids2)

    fresh = model.chat(chat.messages[:4], max_new_tokens=5)
    assert second.token_ids == fresh.token_ids and second.content == fresh.content
    assert second.token_ids == hf_answer(hf, ids2, 5, tok.eos_id)
    assert chat.messages[-1] == {"role": "assistant", "content": second.content}


def test_growth_fallback_and_no_stop_token(pair, monkeypatch):
    """A turn that overflows the cache grows it (keeping the prefix); a history edited so it re-encodes
    differently re-prefills from the first differing token; stop_token_ids=[] ends turns at the budget."""
    hf, model = pair
    tok = model.tokenizer
    chat = model.chat_session(max_new_tokens=4, prefill_chunk=16, min_cache=32, stop_token_ids=[])
    prefilled = count_prefill(monkeypatch, model.generator)
    first = chat.send("Hello")
    assert chat._cache.slots == 32
    second = chat.send("Tell me a long story about a cat and a dog")
    ids1, ids2 = tok.encode_chat(chat.messages[:1]), tok.encode_chat(chat.messages[:3])
    assert chat._cache.slots == 64
    # this answer's text tokenizes differently from its ids: the turn re-prefills from where they differ
    assert len(ids1) <= second.cached_tokens == common_prefix(ids2, ids1 + first.token_ids[:-1]) < len(ids1) + 3
    assert sum(prefilled[1:]) == len(ids2) - second.cached_tokens
    assert second.token_ids == hf_greedy_batch(hf, [ids2], 4, CFG.vocab_size - 1, CFG.pad_token_id)[0]

    cached = ids2 + second.token_ids[:-1]
    chat.messages[-1]["content"] = "Once upon a time."  # the history no longer matches the cache
    prefilled[:] = []
    third = chat.send("And then?")
    ids3 = tok.encode_chat(chat.messages[:5])
    assert third.cached_tokens == common_prefix(ids3, cached) < len(cached)
    assert sum(prefilled) == len(ids3) - third.cached_tokens
    assert third.token_ids == hf_greedy_batch(hf, [ids3], 4, CFG.vocab_size - 1, CFG.pad_token_id)[0]
    assert all(r.finish_reason == "length" and r.completion_tokens == 4 for r in (first, second, third))

    chat.reset()
    assert chat.messages == [] and chat.send("Hello").token_ids == first.token_ids
