"""Tokenizer: chat ids equal mistral-common's, round trips, reasoning split, incremental decoding, the
text-only tokenizer.json backend. Everything offline: files are built locally."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral4_jax.serve.chat import IncrementalDecoder, Tokenizer, split_reasoning
from mistral4_jax.cli.demo import write_synthetic_tekken

MULTIBYTE = "Grüße, naïve café 😀👍🏽 日本語のテキスト — ∑x² ≠ ∞; Ελληνικά; emoji family 👨‍👩‍👧 end"

REQUESTS = {
    "user": [{"role": "user", "content": "Hello, who are you?"}],
    "system": [{"role": "system", "content": "You are a concise assistant."},
               {"role": "user", "content": "Name three primes."}],
    "multi_turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What is 2+2?"}],
    "reasoning_history": [{"role": "user", "content": "Solve x+1=3"},
                          {"role": "assistant", "content": "x = 2", "reasoning": "subtract one from both sides"},
                          {"role": "user", "content": "And x+2=3?"}],
    "text_parts": [{"role": "system", "content": [{"type": "text", "text": "You answer in French."}]},
                   {"role": "user", "content": [{"type": "text", "text": "Bonjour"},
                                                {"type": "text", "text": " tout le monde"}]}],
    "consecutive_users": [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
    # the old hand-written layout encoded this one differently from mistral-common
    "consecutive_assistants_thinking": [
        {"role": "user", "content": "Think twice."},
        {"role": "assistant", "content": "first", "reasoning": "one"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "two"}, {"type": "text", "text": "second"}]},
        {"role": "user", "content": "Go on."}],
    "unicode": [{"role": "user", "content": MULTIBYTE}],
}
EFFORTS = [None, "none", "high"]


# ----------------------------------------------------------------------------------------------------
# fixtures: a v15 tekken.json, its tokenizer.json conversion, a tiny trained tokenizer
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tekken_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tekken")
    write_synthetic_tekken(d)
    return d


@pytest.fixture(scope="module")
def reference(tekken_dir) -> "MistralTokenizer":
    """mistral-common itself, for the expected ids."""
    return MistralTokenizer.from_file(str(tekken_dir / "tekken.json"))


@pytest.fixture(scope="module")
def tekken(tekken_dir) -> Tokenizer:
    tok = Tokenizer.from_dir(tekken_dir)
    assert tok.backend == "tekken"
    return tok


def reference_ids(reference: "MistralTokenizer", messages, effort, continue_final_message=False) -> list[int]:
    kwargs = {} if effort is None else {"reasoning_effort": effort}
    req = ChatCompletionRequest.from_openai(messages, continue_final_message=continue_final_message, **kwargs)
    return reference.encode_chat_completion(req).tokens


@pytest.fixture(scope="module")
def hf_dir(tekken_dir, tmp_path_factory) -> Path:
    """tokenizer.json converted from the tekken file (transformers' converter), with a tokenizer_config.json."""
    conv = pytest.importorskip("transformers.integrations.mistral.tokenizer")
    d = tmp_path_factory.mktemp("hf")
    conv.MistralConverter(str(tekken_dir / "tekken.json")).converted().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> Tokenizer:
    tok = Tokenizer.from_dir(hf_dir)
    assert tok.backend == "tokenizers" and tok.mistral is None
    return tok


TINY_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                 "[THINK]", "[/THINK]"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained here on a few sentences; bos/eos given under other names in the config."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=TINY_SPECIALS + ["<BOS>", "<EOS>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", MULTIBYTE, "hello world, how are you today?"] * 20
    hf.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("tiny")
    hf.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<BOS>", "eos_token": "<EOS>"}))
    return d


# ----------------------------------------------------------------------------------------------------
# chat encoding == mistral-common
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("effort", EFFORTS)
@pytest.mark.parametrize("name", list(REQUESTS))
def test_tekken_chat_equals_mistral_common(tekken, reference, name, effort):
    messages = REQUESTS[name]
    assert tekken.encode_chat(messages, reasoning_effort=effort) == reference_ids(reference, messages, effort)


def test_tekken_chat_layout_is_the_documented_one(tekken):
    ids = tekken.encode_chat(REQUESTS["system"], reasoning_effort="high")
    text = tekken.decode(ids, skip_special=False)
    assert text == ('<s>[SYSTEM_PROMPT]You are a concise assistant.[/SYSTEM_PROMPT][MODEL_SETTINGS]'
                    '{"reasoning_effort": "high"}[/MODEL_SETTINGS][INST]Name three primes.[/INST]')
    default = tekken.decode(tekken.encode_chat(REQUESTS["user"]), skip_special=False)
    assert '[MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]' in default
    assert tekken.reasoning_efforts == ("none", "high")
    assert tekken.think_ids == (34, 35)


def test_continue_final_message(tekken, reference):
    messages = REQUESTS["user"] + [{"role": "assistant", "content": "I am"}]
    want = reference_ids(reference, messages, None, continue_final_message=True)
    assert want[-1] != tekken.eos_id
    assert tekken.encode_chat(messages, continue_final_message=True) == want


@pytest.mark.parametrize("effort", ["low", "medium", "extreme", "HIGH", "", 1])
def test_unknown_reasoning_effort_raises(tekken, effort):
    with pytest.raises(ValueError, match="reasoning_effort"):
        tekken.encode_chat(REQUESTS["user"], reasoning_effort=effort)


def test_bad_messages_raise(tekken):
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    with pytest.raises(ValueError, match="image"):
        tekken.encode_chat(image)
    with pytest.raises(ValueError, match="non-empty list"):
        tekken.encode_chat([])
    with pytest.raises(ValueError, match=r"messages\[0\].*role"):
        tekken.encode_chat([{"content": "no role"}])
    with pytest.raises(ValueError, match=r"messages\[1\]: unknown role 'robot'"):
        tekken.encode_chat([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content must be"):
        tekken.encode_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="invalid chat request"):  # ends with an assistant message, not a prefix
        tekken.encode_chat(REQUESTS["user"] + [{"role": "assistant", "content": "x"}])


def test_old_bundled_tekken_without_model_settings(tmp_path):
    """mistral-common's bundled tekken_240911.json (v3): no [THINK]/[MODEL_SETTINGS]; 'none' is a no-op."""
    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    shutil.copy(src, tmp_path / "tekken.json")
    tok = Tokenizer.from_dir(tmp_path)
    ref = MistralTokenizer.from_file(str(src))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (131072, 1, 2, 11)
    assert tok.reasoning_efforts == ("none",) and tok.think_ids is None
    msgs = REQUESTS["system"]
    want = ref.encode_chat_completion(ChatCompletionRequest.from_openai(msgs)).tokens
    assert tok.encode_chat(msgs) == want == tok.encode_chat(msgs, reasoning_effort="none")
    with pytest.raises(ValueError, match="reasoning_effort"):
        tok.encode_chat(msgs, reasoning_effort="high")
    assert tok.split_reasoning(tok.encode("plain answer")) == ("", "plain answer")


# ----------------------------------------------------------------------------------------------------
# text round trips and properties; the text-only tokenizer.json backend
# ----------------------------------------------------------------------------------------------------

def test_round_trip_and_backends_agree(tekken, hf_tok):
    hf = hf_tok
    for text in ["Hello world", MULTIBYTE, "  leading spaces\nand\ttabs  ", "code: def f(x): return x**2", ""]:
        ids = tekken.encode(text)
        assert tekken.decode(ids) == text
        assert hf.encode(text) == ids and hf.decode(ids) == text
        assert tekken.encode(text, bos=True) == [1] + ids == hf.encode(text, bos=True)
    # special-token strings in plain text stay text (as in mistral-common)
    ids = tekken.encode("a [INST] b [THINK]")
    assert not set(ids) & tekken.special_ids and hf.encode("a [INST] b [THINK]") == ids
    for tok in (tekken, hf):
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (131072, 1, 2, 11)
        assert tok.token_id("[THINK]") == 34 and tok.token_id("[nope]") is None
        assert tok.think_ids == (34, 35)
        assert tok.decode([1, 3, *ids, 4, 2]) == "a [INST] b [THINK]"
        assert tok.decode([1, 3, *ids, 4, 2], skip_special=False) == "<s>[INST]a [INST] b [THINK][/INST]</s>"
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([5, 131072])
        with pytest.raises(ValueError):
            tok.decode([-1])


def test_tokenizer_json_backend_is_text_only(hf_tok, tiny_dir):
    """mistral-common reads tekken.json (or SentencePiece) only, and a tokenizer.json does not record the
    tokenizer version or model settings: chat encoding asks for tekken.json."""
    for tok in (hf_tok, Tokenizer.from_dir(tiny_dir)):
        assert tok.reasoning_efforts == ("none",)
        for call in (lambda: tok.encode_chat(REQUESTS["user"]), lambda: tok.encode_chat_with_images(REQUESTS["user"]),
                     lambda: tok.image_processor()):
            with pytest.raises(ValueError, match="tekken.json"):
                call()


def test_tiny_tokenizer_json(tiny_dir):
    """A tokenizer.json-only directory (a small BPE trained here): bos/eos under config names, pad, round
    trips, the reasoning split on its own [THINK] ids."""
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.backend == "tokenizers"
    bos, eos = tok.token_id("<BOS>"), tok.token_id("<EOS>")
    assert (tok.bos_id, tok.eos_id) == (bos, eos)
    assert tok.pad_id == tok.token_id("<pad>")
    for text in ["the quick brown fox", MULTIBYTE, "unseen wörds ✓"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text, bos=True) == [bos] + tok.encode(text)
    b, e = tok.think_ids
    assert tok.split_reasoning([b, *tok.encode("hmm 😀"), e, *tok.encode("fine"), eos]) == ("hmm 😀", "fine")


def test_backend_choice(tekken_dir, hf_dir, tmp_path):
    d = tmp_path / "both"
    d.mkdir()
    os.symlink(tekken_dir / "tekken.json", d / "tekken.json")
    os.symlink(hf_dir / "tokenizer.json", d / "tokenizer.json")
    assert Tokenizer.from_dir(d).backend == "tekken"
    assert Tokenizer.from_dir(d, backend="tokenizers").backend == "tokenizers"
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(hf_dir, backend="tekken")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="backend"):
        Tokenizer.from_dir(d, backend="sentencepiece")


# ----------------------------------------------------------------------------------------------------
# reasoning split
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("just an answer", ("", "just an answer")),
    ("[THINK]let me think[/THINK]The answer is 4.", ("let me think", "The answer is 4.")),
    ("[THINK]still thinking, cut off", ("still thinking, cut off", "")),
    ("[THINK][/THINK]empty reasoning", ("", "empty reasoning")),
    ("reasoning opened by the prompt[/THINK]answer", ("reasoning opened by the prompt", "answer")),
    ("pre[THINK]r[/THINK]post", ("r", "prepost")),
    ("[THINK]a[/THINK]b[THINK]c[/THINK]", ("a", "b[THINK]c[/THINK]")),
    ("", ("", "")),
])
def test_split_reasoning_text(text, want):
    assert split_reasoning(text) == want


def test_split_reasoning_ids(tekken, hf_tok):
    for tok in (tekken, hf_tok):
        b, e = tok.think_ids
        r, c = tok.encode("I should add 2 and 2 😀"), tok.encode("It is 4 ✓.")
        assert tok.split_reasoning([b, *r, e, *c, tok.eos_id]) == ("I should add 2 and 2 😀", "It is 4 ✓.")
        assert tok.split_reasoning([b, *r]) == ("I should add 2 and 2 😀", "")
        assert tok.split_reasoning([*r, e, *c]) == ("I should add 2 and 2 😀", "It is 4 ✓.")
        assert tok.split_reasoning(c + [tok.eos_id]) == ("", "It is 4 ✓.")
        # same answer from ids and from text decoded with specials kept
        ids = [b, *r, e, *c, tok.eos_id]
        assert split_reasoning(tok.decode(ids, skip_special=False).removesuffix("</s>")) == tok.split_reasoning(ids)
        assert split_reasoning(ids, tok) == tok.split_reasoning(ids)
    with pytest.raises(ValueError):
        split_reasoning([1, 2, 3])


# ----------------------------------------------------------------------------------------------------
# incremental decoding
# ----------------------------------------------------------------------------------------------------

def _stream(tok: Tokenizer, ids: list[int], chunk: int, skip_special: bool = True) -> tuple[str, list[str]]:
    dec = IncrementalDecoder(tok, skip_special=skip_special)
    pieces = [dec.feed(ids[i:i + chunk] if chunk > 1 else ids[i]) for i in range(0, len(ids), chunk)]
    pieces.append(dec.flush())
    assert dec.text == "".join(pieces)
    return "".join(pieces), pieces


def _check_incremental(tok: Tokenizer) -> None:
    text = MULTIBYTE + " and again: " + MULTIBYTE[::-1]
    ids = tok.encode(text)
    # the byte-level vocabulary really splits characters here, so holding back matters
    partial = [i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd")]
    assert partial, "test text should split some multi-byte characters across tokens"
    for chunk in (1, 2, 5):
        full, pieces = _stream(tok, ids, chunk)
        assert full == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoding_tiny_bpe(tiny_dir):
    """A small BPE whose tokens straddle character boundaries everywhere (long pending runs)."""
    _check_incremental(Tokenizer.from_dir(tiny_dir))


def test_incremental_decoding_equals_full_decoding(tekken, hf_tok):
    for tok in (tekken, hf_tok):
        _check_incremental(tok)
    # with special tokens in the stream (reasoning block), both policies
    ids = [tekken.bos_id, *tekken.think_ids[:1], *tekken.encode("pensons 🤔"), tekken.think_ids[1],
           *tekken.encode("réponse ✓"), tekken.eos_id]
    for skip in (True, False):
        assert _stream(tekken, ids, 1, skip)[0] == tekken.decode(ids, skip_special=skip)
    assert tekken.incremental_decoder().feed(tekken.encode("abc")) == "abc"
    # a genuinely invalid byte (lone continuation byte 0x80 = id 1000 + 0x80): emitted as U+FFFD once
    # later text completes, or at flush() when it is last
    lone = 1000 + 0x80
    for tok in (tekken, hf_tok):
        ids = tok.encode("x") + [lone] + tok.encode("abc 日本") + [lone]
        full, pieces = _stream(tok, ids, 1)
        assert full == tok.decode(ids) == "x\ufffdabc 日本\ufffd" and pieces[-1] == "\ufffd"
