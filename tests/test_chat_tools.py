"""Function calling: tools, tool calls and tool results encode to mistral-common's ids; answers that
mistral-common itself encodes parse back to the same calls; bad requests raise ValueError; `model.chat`
plumbs tools end to end on a tiny model. Everything offline (synthetic v15 tekken.json)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral4_jax import Mistral4
from mistral4_jax import model as M
from mistral4_jax.serve.chat import Tokenizer, parse_answer
from mistral4_jax.cli.demo import write_synthetic_tekken
from mistral4_jax.serve.generate import Generation
from helpers import TINY

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search-web", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}}}}}
NO_PARAMS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, SEARCH, NO_PARAMS]


def call(cid: str, name: str, args: dict) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


PARIS, TOKYO = {"city": "Paris"}, {"city": "東京 😀", "unit": "C"}
NESTED = {"query": "naïve \"quotes\" \\ back", "filters": {"year": [2024, 2025], "safe": True, "x": None}}
TURN = [{"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris and Tokyo, and search the news."},
        {"role": "assistant", "content": None, "tool_calls": [
            call("aaaaaaaa1", "get_weather", PARIS), call("aaaaaaaa2", "get_weather", TOKYO),
            call("aaaaaaaa3", "search-web", NESTED)]},
        {"role": "tool", "tool_call_id": "aaaaaaaa3", "content": "[{\"title\": \"Nouvelles\"}]"},  # out of order
        {"role": "tool", "tool_call_id": "aaaaaaaa1", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "aaaaaaaa2", "content": "雨"}]
CONVERSATIONS = {
    "first_turn": TURN[:2],
    "pending_tool_results": TURN,  # the prompt ends with tool results: the model answers them
    "answered_then_next_user": TURN + [{"role": "assistant", "content": "21 °C in Paris, rain in Tokyo."},
                                       {"role": "user", "content": "And tomorrow?"}],
    "call_with_reasoning_and_text": [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "reasoning": "I should call now().", "content": "Let me check.",
         "tool_calls": [call("bbbbbbbb1", "now", {})]},
        {"role": "tool", "tool_call_id": "bbbbbbbb1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks!"}],
}
EFFORTS = [None, "high"]


@pytest.fixture(scope="module")
def tekken_file(tmp_path_factory) -> Path:
    return write_synthetic_tekken(tmp_path_factory.mktemp("tekken"))


@pytest.fixture(scope="module")
def tok(tekken_file) -> Tokenizer:
    return Tokenizer.from_dir(tekken_file)


@pytest.fixture(scope="module")
def reference(tekken_file) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tekken_file))


def reference_ids(reference: MistralTokenizer, messages, tools, effort=None) -> list[int]:
    kwargs = {} if effort is None else {"reasoning_effort": effort}
    return reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools, **kwargs)).tokens


# ----------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("effort", EFFORTS)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tool_conversations_equal_mistral_common(tok, reference, name, effort):
    messages = CONVERSATIONS[name]
    want = reference_ids(reference, messages, TOOLS, effort)
    for choice in ("auto", "none", "required", {"type": "function", "function": {"name": "now"}}):
        assert tok.encode_chat(messages, reasoning_effort=effort, tools=TOOLS, tool_choice=choice) == want
    assert tok.encode_chat(messages, reasoning_effort=effort) == reference_ids(reference, messages, None, effort)


def test_tool_layout(tok):
    """[AVAILABLE_TOOLS] before the model settings at the first user message; parallel calls as
    [TOOL_CALLS]name[ARGS]json each; results in call order; no call ids (v13+)."""
    text = tok.decode(tok.encode_chat(CONVERSATIONS["pending_tool_results"], tools=[WEATHER], reasoning_effort="high"),
                      skip_special=False)
    tools_json = json.dumps([WEATHER], ensure_ascii=False)
    assert text == (
        "<s>[SYSTEM_PROMPT]Use tools when useful.[/SYSTEM_PROMPT]"
        f"[AVAILABLE_TOOLS]{tools_json}[/AVAILABLE_TOOLS]"
        '[MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS]'
        "[INST]Weather in Paris and Tokyo, and search the news.[/INST]"
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]get_weather[ARGS]{"city": "東京 😀", "unit": "C"}'
        f"[TOOL_CALLS]search-web[ARGS]{json.dumps(NESTED, ensure_ascii=False)}</s>"
        '[TOOL_RESULTS]{"temp": 21}[/TOOL_RESULTS][TOOL_RESULTS]雨[/TOOL_RESULTS]'
        '[TOOL_RESULTS][{"title": "Nouvelles"}][/TOOL_RESULTS]')
    assert "aaaaaaaa" not in text
    assert [tok.token_id(t) for t in ("[AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")] \
        == [5, 7, 9, 32, 33]  # the ranks of Mistral-Small-4's tekken.json


@pytest.mark.parametrize("kwargs, match", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time.*not among the tools"),
    ({"tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": None, "tool_choice": "required"}, "needs tools"),
    ({"tools": {"get_weather": WEATHER}}, "tools must be a list"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}]},
     r"tools\[1\] \(bad\): parameters are not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": ["city"]}}]}, r"tools\[0\] \(bad\)"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, r"tools\[0\].function.name"),
    ({"tools": [WEATHER, WEATHER]}, r"tools\[1\]: a second tool named 'get_weather'"),
    ({"tools": [{"type": "retrieval"}]}, r"tools\[0\] must be"),
])
def test_bad_tools_raise(tok, kwargs, match):
    kwargs = {"tools": TOOLS, **kwargs}
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(TURN[:2], **kwargs)


@pytest.mark.parametrize("messages, match", [
    (TURN[:3] + [{"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "x"}], "Unexpected tool call id zzzzzzzzz"),
    (TURN[:3] + [{"role": "tool", "content": "x"}], r"messages\[3\]: a tool message needs a 'tool_call_id'"),
    (TURN[:2] + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "now", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "null", "content": "x"}],
     "Tool call id must be a non-empty string"),
    ([{"role": "user", "content": "hi", "tool_calls": []}], r"messages\[0\].tool_calls must be a list, on an assistant"),
])
def test_bad_tool_messages_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages, tools=TOOLS)


def test_tools_need_tekken(tekken_file, tmp_path):
    """A tokenizer.json-only directory cannot encode chat, tools included (ValueError, not a wrong prompt)."""
    conv = pytest.importorskip("transformers.integrations.mistral.tokenizer")
    conv.MistralConverter(str(tekken_file)).converted().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tekken.json"):
        Tokenizer.from_dir(tmp_path).encode_chat(TURN[:2], tools=TOOLS)


# ---------------------------------------------------------------------------------------- parsing
ANSWERS = {  # assistant messages as mistral-common encodes them; (reasoning, content, calls)
    "one_call": ("", "", [("get_weather", PARIS)]),
    "parallel_unicode": ("", "", [("get_weather", PARIS), ("get_weather", TOKYO), ("search-web", NESTED)]),
    "text_then_call": ("", "I will look it up.", [("now", {})]),
    "reasoning_text_calls": ("The user wants 2 cities → 2 calls.", "Checking…",
                             [("get_weather", PARIS), ("get_weather", TOKYO)]),
    "reasoning_then_call": ("думаю", "", [("search-web", NESTED)]),
    "plain_answer": ("hmm", "No tool needed: 4.", []),
}


def mistral_answer(reference: MistralTokenizer, reasoning: str, content: str, calls) -> list[int]:
    """The ids of an assistant message (with its </s>) as mistral-common's v15 tokenizer writes them."""
    msg = {"role": "assistant", "content": content or None,
           "tool_calls": [call(f"cccccccc{i}", n, a) for i, (n, a) in enumerate(calls)] or None}
    if reasoning:
        msg["reasoning"] = reasoning
    message = AssistantMessage.from_openai(msg)
    return reference.instruct_tokenizer.encode_assistant_message(message, is_before_last_user_message=False)


@pytest.mark.parametrize("name", list(ANSWERS))
def test_parse_mistral_common_answers(tok, reference, name):
    reasoning, content, calls = ANSWERS[name]
    ids = mistral_answer(reference, reasoning, content, calls)
    assert ids[-1] == tok.eos_id and (tok.token_id("[TOOL_CALLS]") in ids) == bool(calls)
    answer = parse_answer(tok, ids[:-1], "stop")  # the generator returns the answer without its stop token
    assert (answer.reasoning, answer.content, answer.error) == (reasoning, content, None)
    assert answer.finish_reason == ("tool_calls" if calls else "stop")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer.tool_calls] == calls
    written = tok.decode(ids, skip_special=False)  # arguments: the text the model wrote after [ARGS]
    assert all(f'[ARGS]{c["function"]["arguments"]}' in written for c in answer.tool_calls)
    ids_of_calls = [c["id"] for c in answer.tool_calls]
    assert all(len(i) == 9 and i.isalnum() for i in ids_of_calls) and len(set(ids_of_calls)) == len(calls)
    assert parse_answer(tok, ids[:-1], "stop") == answer  # deterministic ids
    assert all(c["type"] == "function" for c in answer.tool_calls)


@pytest.mark.parametrize("name", [n for n in ANSWERS if ANSWERS[n][2]])
def test_parsed_calls_reencode_to_the_generated_ids(tok, reference, name):
    """Sending the parsed answer back in the history (with results for its calls) reproduces, through
    mistral-common, the ids the model generated: arguments are written as mistral-common writes them."""
    prompt = tok.encode_chat(TURN[:2], tools=TOOLS)
    generated = mistral_answer(reference, *ANSWERS[name])
    answer = parse_answer(tok, generated[:-1], "stop")
    assistant = {"role": "assistant", "content": answer.content or None, "tool_calls": answer.tool_calls}
    if answer.reasoning:
        assistant["reasoning"] = answer.reasoning
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in answer.tool_calls]
    history = tok.encode_chat(TURN[:2] + [assistant] + results, tools=TOOLS)
    assert history[:len(prompt) + len(generated)] == prompt + generated


@pytest.mark.parametrize("text, finish, match", [
    ('[TOOL_CALLS]get_weather{"city": "Paris"}', "stop", r"tool call 0: .*\[ARGS\]"),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', "length", "tool call 0: .*cut off by max_new_tokens"),
    ('[TOOL_CALLS]get_weather[ARGS][1, 2]', "stop", "tool call 0: the arguments are not a JSON object"),
    ('[TOOL_CALLS]get_weather[ARGS]"Paris"', "stop", "tool call 0: the arguments of 'get_weather' are not a JSON object"),
    ('[TOOL_CALLS]get_weather[ARGS]"[1, 2]"', "stop", "tool call 0: the arguments of 'get_weather' are not a JSON object"),
    ('[TOOL_CALLS][ARGS]{}', "stop", "tool call 0: no function name"),
    ('ok[TOOL_CALLS]now[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{city: Paris}', "stop", "tool call 1: "),
])
def test_malformed_calls_are_reported(tok, text, finish, match):
    specials = {s: tok.token_id(s) for s in ("[TOOL_CALLS]", "[ARGS]")}
    ids: list[int] = []
    for piece in text.replace("[TOOL_CALLS]", "\0[TOOL_CALLS]\0").replace("[ARGS]", "\0[ARGS]\0").split("\0"):
        ids += [specials[piece]] if piece in specials else tok.encode(piece)
    answer = parse_answer(tok, ids, finish)
    assert answer.finish_reason == "error" and answer.error is not None
    assert re.search(match, answer.error), answer.error


def test_old_tekken_v3_tool_calls(tmp_path):
    """The bundled v3 Tekken writes calls as one JSON list: mistral-common's own decoder for that version
    parses them (call ids come from the answer there)."""
    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    shutil.copy(src, tmp_path / "tekken.json")
    old, ref = Tokenizer.from_dir(tmp_path), MistralTokenizer.from_file(str(src))
    msgs = [{"role": "user", "content": "Paris?"}]
    assert old.encode_chat(msgs, tools=[WEATHER]) == reference_ids(ref, msgs, [WEATHER])
    ids = mistral_answer(ref, "", "", [("get_weather", PARIS), ("get_weather", TOKYO)])
    answer = parse_answer(old, ids[:-1], "stop")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer.tool_calls] == \
        [("get_weather", PARIS), ("get_weather", TOKYO)]
    assert answer.finish_reason == "tool_calls" and answer.content == ""


# --------------------------------------------------------------------------------- model.chat
@pytest.fixture(scope="module")
def model(tok):
    """The tiny config with the real vocabulary and zero weights (what is tested here is the plumbing around
    generation; zeros skip the random init, ~15 s of CPU for this vocabulary)."""
    cfg = TINY.replace(vocab_size=131072)
    m = Mistral4(cfg, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), M.abstract_params(cfg)))
    m.tokenizer = tok
    return m


def test_chat_parses_calls_and_reports_malformed_ones(model, reference, monkeypatch):
    """Generation replaced by canned answers (mistral-common's ids): a batch where one answer calls tools,
    one is malformed and one is text; nothing raises, each result says what it holds."""
    good = mistral_answer(reference, *ANSWERS["reasoning_text_calls"])[:-1]
    bad = good[: len(good) - 3]  # the last call's arguments cut short
    text = mistral_answer(reference, *ANSWERS["plain_answer"])[:-1]
    seen = {}

    canned = [(good, "stop"), (bad, "length"), (text, "stop")]

    def fake_generate(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stops, images=None, grammars=None):
        seen.update(prompts=prompts, stops=stops, grammars=grammars)
        return [Generation(ids, finish, len(p)) for p, (ids, finish) in zip(prompts, canned)]

    monkeypatch.setattr(model, "generate", fake_generate)
    convs = [TURN[:2], CONVERSATIONS["pending_tool_results"], [{"role": "user", "content": "2+2?"}]]
    results = model.chat(convs, tools=TOOLS, reasoning_effort="high")
    assert seen["prompts"] == [reference_ids(reference, c, TOOLS, "high") for c in convs]
    assert seen["stops"] == (model.tokenizer.eos_id,) and seen["grammars"] == [None] * 3  # "auto": unconstrained
    ok, broken, plain = results
    assert (ok.finish_reason, ok.error, ok.reasoning, ok.content) == ("tool_calls", None, *ANSWERS["reasoning_text_calls"][:2])
    assert [json.loads(c["function"]["arguments"]) for c in ok.tool_calls] == [PARIS, TOKYO]
    assert broken.finish_reason == "error" and "tool call 1" in broken.error and "cut off" in broken.error
    assert [c["function"]["name"] for c in broken.tool_calls] == ["get_weather"]  # the calls before the bad one
    assert (plain.finish_reason, plain.tool_calls, plain.content) == ("stop", [], "No tool needed: 4.")
    model.chat(TURN[:2], tools=TOOLS, tool_choice="none")  # text only: a grammar without [TOOL_CALLS]
    assert seen["stops"] == (model.tokenizer.eos_id,) and "<[9]>" not in seen["grammars"][0].lark
