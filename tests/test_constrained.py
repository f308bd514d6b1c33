"""Constrained decoding: grammars from chat requests (mistral-common's GrammarFactory + llguidance) accept the
answers mistral-common writes and refuse the rest; a tiny model with random weights, sampling at temperature
1, can only produce well-formed calls whose arguments validate, and JSON answers valid under their schema;
a JSONL batch mixes constrained and unconstrained lines without changing the unconstrained ones; the CLI's
--tools. Offline (synthetic v15 tekken.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jsonschema
import mistral_common
import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral4_jax import Mistral4, cli
from mistral4_jax import model as M
from mistral4_jax.cli.demo import write_synthetic_tekken
from mistral4_jax.serve import batch
from mistral4_jax.sharding import make_mesh
from mistral4_jax.serve.chat import ChatSession, Tokenizer
from mistral4_jax.serve.chat.grammar import chat_grammar
from mistral4_jax.serve.chat.session import chat_result
from mistral4_jax.serve.constrain import Masks
from mistral4_jax.serve.generate import Generation
from helpers import TINY

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"type": "string", "enum": ["C", "F"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {"name": "book-table", "parameters": {
    "type": "object", "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 12},
                                     "vegan": {"type": "boolean"},
                                     "times": {"type": "array", "items": {"enum": ["19:00", "20:30"]}, "maxItems": 2}},
    "required": ["guests", "vegan"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: {} only
TOOLS = [WEATHER, BOOK, NOW]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "maxProperties": 0}
           for t in TOOLS}
ANSWER_SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 12}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "sources": {"type": "array", "items": {"type": "string", "enum": ["web", "book"]}, "maxItems": 3}},
    "required": ["answer", "confidence"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
USER = [{"role": "user", "content": "Weather in Paris, and book a table."}]
SEEDS = 20
VOCAB = 8192  # the first 8,192 ids of the real vocabulary: sampling 20 rows costs 1/16 of the full one on CPU


@pytest.fixture(scope="module")
def tekken_file(tmp_path_factory) -> Path:
    return write_synthetic_tekken(tmp_path_factory.mktemp("tekken"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tok(tekken_file) -> Tokenizer:
    return Tokenizer.from_dir(tekken_file)


@pytest.fixture(scope="module")
def reference(tekken_file) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tekken_file))


def grammar(tok, tools=TOOLS, choice="required", response_format=None, reasoning=False, parallel=True):
    return chat_grammar(tok, tools, choice, response_format, "high" if reasoning else "none", parallel)


def accepts(g, ids) -> bool:
    """The grammar takes these ids and may end after them."""
    masks = Masks([g], VOCAB)
    masks.feed(0, ids)
    if masks.errors[0] is not None:
        return False
    return masks.complete[0] or bool(masks.matchers[0].is_accepting())


def allowed(g, ids=()) -> np.ndarray:
    """Ids the grammar allows after `ids`."""
    masks = Masks([g], VOCAB)
    masks.feed(0, ids)
    return np.flatnonzero(np.unpackbits(masks.fill()[0].view(np.uint8), bitorder="little"))


def assistant_ids(reference, reasoning="", content="", calls=()) -> list[int]:
    """An assistant answer as mistral-common's v15 tokenizer writes it, without its </s>."""
    msg = {"role": "assistant", "content": content or None, "tool_calls": [
        {"id": f"c{i:08d}", "type": "function", "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
        for i, (n, a) in enumerate(calls)] or None}
    if reasoning:
        msg["reasoning"] = reasoning
    ids = reference.instruct_tokenizer.encode_assistant_message(AssistantMessage.from_openai(msg), False)
    return ids[:-1]


PARIS = ("get_weather", {"city": "Paris", "unit": "C"})
TABLE = ("book-table", {"guests": 4, "vegan": True, "times": ["20:30"]})


# --------------------------------------------------------------------------------------- grammars
def test_unconstrained_requests_have_no_grammar(tok):
    assert grammar(tok, choice="auto") is None
    assert grammar(tok, tools=None, choice="auto", response_format={"type": "text"}) is None
    assert grammar(tok, tools=None, choice="none") is None  # nothing to forbid


def test_required_accepts_mistral_common_calls(tok, reference):
    g = grammar(tok)
    for calls in ([PARIS], [PARIS, TABLE], [("now", {})], [("get_weather", {"city": "東京😀", "unit": "F", "days": 3})]):
        assert accepts(g, assistant_ids(reference, calls=calls)), calls
    assert not accepts(g, assistant_ids(reference, content="It is sunny."))  # text instead of a call
    assert not accepts(g, assistant_ids(reference, content="Let me check.", calls=[PARIS]))  # text first
    assert not accepts(g, assistant_ids(reference, calls=[("get_weather", {"city": "Paris"})]))  # "unit" missing
    assert not accepts(g, assistant_ids(reference, calls=[("get_weather", {"city": "Paris", "unit": "K"})]))
    assert not accepts(g, assistant_ids(reference, calls=[("now", {"x": 1})]))  # no parameters: {}
    assert not accepts(g, assistant_ids(reference, calls=[("get_time", {})]))  # not a tool
    assert not accepts(grammar(tok, parallel=False), assistant_ids(reference, calls=[PARIS, TABLE]))
    assert accepts(grammar(tok, parallel=False), assistant_ids(reference, calls=[TABLE]))
    assert set(allowed(g).tolist()) == {tok.token_id("[TOOL_CALLS]")}  # the answer opens with a call
    assert tok.eos_id in allowed(g, assistant_ids(reference, calls=[PARIS]))  # and may end after one


def test_reasoning_block_only_with_reasoning_on(tok, reference):
    ids = assistant_ids(reference, reasoning="Two cities → two calls.", calls=[PARIS])
    assert accepts(grammar(tok, reasoning=True), ids)
    assert not accepts(grammar(tok, reasoning=False), ids)
    assert tok.reasons("high") and not tok.reasons("none") and not tok.reasons(None)  # Mistral Small 4: "none" default


def test_named_choice_calls_that_function_only(tok, reference):
    g = grammar(tok, choice={"type": "function", "function": {"name": "book-table"}})
    assert accepts(g, assistant_ids(reference, calls=[TABLE]))
    assert not accepts(g, assistant_ids(reference, calls=[PARIS]))


def test_none_forbids_calls(tok, reference):
    g = grammar(tok, choice="none")
    assert accepts(g, assistant_ids(reference, content="No tools: 4."))
    assert tok.token_id("[TOOL_CALLS]") not in allowed(g)
    assert not accepts(g, assistant_ids(reference, calls=[PARIS]))


def test_json_answers(tok):
    g = grammar(tok, tools=None, choice="auto", response_format=JSON_SCHEMA)
    good = {"answer": "Paris", "confidence": 0.9, "sources": ["web"]}
    assert accepts(g, tok.encode(json.dumps(good, ensure_ascii=False)))
    for bad in ({"answer": "Paris"}, {"answer": "Paris", "confidence": 2}, {**good, "extra": 1}):
        assert not accepts(g, tok.encode(json.dumps(bad))), bad
    assert not accepts(g, tok.encode("Paris"))
    obj = grammar(tok, tools=None, choice="auto", response_format={"type": "json_object"})
    assert accepts(obj, tok.encode('{"a": [1, {"b": null}]}')) and not accepts(obj, tok.encode('{"a": 1'))


@pytest.mark.parametrize("kwargs, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema is not a valid JSON schema"),
    ({"response_format": {"type": "xml"}}, "response_format must be"),
    ({"response_format": {"type": "json_schema"}}, "needs 'json_schema'"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "cannot be constrained"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time.*not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "parameters are not a valid JSON schema"),
])
def test_bad_constrained_requests_raise(kwargs, match, model):
    kwargs = {"tools": TOOLS, "tool_choice": "auto", **kwargs}
    with pytest.raises(ValueError, match=match):
        model.chat(USER, **kwargs)


def test_old_tokenizer_cannot_be_constrained(tmp_path):
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json", tmp_path / "tekken.json")
    with pytest.raises(ValueError, match="needs a Tekken tokenizer of version v11"):
        grammar(Tokenizer.from_dir(tmp_path))


# ------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def model(tok):
    """The tiny config with random weights, over the test tokenizer's vocabulary."""
    cfg = TINY.replace(vocab_size=VOCAB)
    m = Mistral4(cfg, M.init_params(cfg, jax.random.PRNGKey(7)))
    m.tokenizer = tok
    return m


def check_calls(result, names=None):
    assert result.finish_reason == "tool_calls" and result.error is None, (result.error, result.token_ids)
    assert result.tool_calls and result.content == "" and result.reasoning == ""
    for c in result.tool_calls:
        name = c["function"]["name"]
        assert name in (names or SCHEMAS)
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


def test_random_model_required_calls_validate(model):
    results = model.chat([USER] * SEEDS, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0,
                         max_new_tokens=64, parallel_tool_calls=False)
    for r in results:
        check_calls(r)
        assert len(r.tool_calls) == 1
    assert len({json.dumps(r.tool_calls) for r in results}) > SEEDS // 2  # the seeds really sample
    assert {r.tool_calls[0]["function"]["name"] for r in results} == set(SCHEMAS)
    # on a mesh (vocabulary and heads over tensor, experts over expert): the masks meet sharded logits, same tokens
    sharded = Mistral4(model.config, M.init_params(model.config, jax.random.PRNGKey(7)),
                       mesh=make_mesh("data=1,expert=4,tensor=2"))
    sharded.tokenizer = model.tokenizer
    on_mesh = sharded.chat([USER] * SEEDS, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0,
                           max_new_tokens=64, parallel_tool_calls=False)
    assert [r.token_ids for r in on_mesh] == [r.token_ids for r in results]
    # parallel calls (the default): each answer is calls until the end token, or cut off by the budget
    parallel = model.chat([USER] * SEEDS, tools=TOOLS, temperature=1.0, seed=100, max_new_tokens=64,
                          tool_choice={"type": "function", "function": {"name": "book-table"}})
    for r in parallel:
        if r.finish_reason != "tool_calls":  # cut off: "length", or "error" when inside a call; complete calls kept
            assert r.completion_tokens == 64 and (r.finish_reason == "length" or "cut off by max_new_tokens" in r.error)
            r.finish_reason, r.error = "tool_calls", None
        check_calls(r, ["book-table"])
    assert max(len(r.tool_calls) for r in parallel) > 1


def test_random_model_json_answers_validate(model):
    results = model.chat([USER] * SEEDS, response_format=JSON_SCHEMA, temperature=1.0, seed=0, max_new_tokens=64,
                         tools=TOOLS, tool_choice="none")  # the tools keep the prompt (and compiled shapes) of the others
    for r in results:
        assert r.finish_reason == "stop" and r.error is None and not r.tool_calls, (r.error, r.content)
        jsonschema.validate(json.loads(r.content), ANSWER_SCHEMA)
    with pytest.raises(ValueError, match="grammars has 1 entries for 2 prompts"):
        model.generate([[1, 2], [3]], grammars=[None])
    cut = chat_result(model.tokenizer, Generation(model.tokenizer.encode(results[0].content)[:3], "length", 9), True)
    assert cut.finish_reason == "error" and "cut off by max_new_tokens" in cut.error


def test_jsonl_batch_with_tools_and_json(model):
    """JSONL lines with tools / tool_choice / response_format share a device batch with a plain line; a bad tool
    choice or schema fails its line only; results carry the calls."""
    tool_line = {"id": "call", "messages": USER, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
                 "temperature": 1.0, "seed": 5}
    lines = [json.dumps(tool_line),
             json.dumps({"id": "json", "messages": USER, "response_format": JSON_SCHEMA, "temperature": 1.0}),
             json.dumps({"id": "plain", "messages": USER, "max_tokens": 4}),
             json.dumps({**tool_line, "id": "bad-choice", "tool_choice": {"type": "function", "function": {"name": "x"}}}),
             json.dumps({"id": "bad-schema", "messages": USER, "response_format": {
                 "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objekt"}}}}),
             json.dumps({**tool_line, "id": "bad-parallel", "parallel_tool_calls": "yes"})]
    out = list(batch.run(model, lines, {"max_new_tokens": 64}, batch_size=4))
    assert [r["id"] for r in out] == ["call", "json", "plain", "bad-choice", "bad-schema", "bad-parallel"]
    call, answer, plain = out[:3]
    assert call["finish_reason"] == "tool_calls" and len(call["tool_calls"]) == 1, call
    name, args = call["tool_calls"][0]["function"]["name"], call["tool_calls"][0]["function"]["arguments"]
    jsonschema.validate(json.loads(args), SCHEMAS[name])
    jsonschema.validate(json.loads(answer["content"]), ANSWER_SCHEMA)
    # the plain line shared a stepped batch with constrained rows (every token allowed) and got what it gets
    # alone, from the on-device decode loop
    assert plain == next(batch.run(model, [lines[2]], {"max_new_tokens": 64})) and plain["completion_tokens"] <= 4
    assert out[3]["error"] == "input line 4: tool_choice names the function 'x', which is not among the tools " \
                              "(get_weather, book-table, now)"
    assert "input line 5: response_format.json_schema.schema is not a valid JSON schema" in out[4]["error"]
    assert "input line 6: 'parallel_tool_calls' must be true or false" in out[5]["error"]


def test_cli_tools(model, tmp_path, monkeypatch, capsys):
    """`generate --prompt --tools F --tool-choice required` prints the call as a JSON line; `chat --tools F`
    asks for the result of each call the model makes and answers with it in the history."""
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    monkeypatch.setattr("mistral4_jax.cli.commands.load_model", lambda args: model)
    common = ["--checkpoint", "unused", "--tools", str(tmp_path / "tools.json"), "--temperature", "1",
              "--max-new-tokens", "48"]
    assert cli.main(["generate", *common, "--prompt", USER[0]["content"], "--tool-choice", "now"]) == 0
    out = capsys.readouterr().out
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith('{"tool_call"')]
    assert line["tool_call"]["function"] == {"name": "now", "arguments": "{}"}
    asked, typed = [], iter([USER[0]["content"], "21 C"])

    def fake_input(prompt=""):
        asked.append(prompt)
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    sessions = []
    monkeypatch.setattr(Mistral4, "chat_session", lambda self, **kw: sessions.append(ChatSession(self, **kw)) or sessions[-1])
    assert cli.main(["chat", *common, "--tool-choice", "required"]) == 0
    (session,) = sessions
    first = session.messages[1]
    for c in first["tool_calls"]:
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    assert asked[1] == f"result of {first['tool_calls'][0]['function']['name']}" \
                       f"({first['tool_calls'][0]['function']['arguments']}) [{first['tool_calls'][0]['id']}]> "
    assert session.messages[2] == {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "21 C"}
    assert asked[-2].startswith("result of ") and session.messages[-1]["tool_calls"]  # "required" again; input ended
    assert "prefilled" in capsys.readouterr().err
