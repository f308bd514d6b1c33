"""Grammars for chat requests: forced tool calls, no tool calls, JSON answers (`constrain.Grammar`).

Which requests are constrained (the rest keep the on-device decode loop):

* ``tool_choice="required"``: the answer is one or more calls ``[TOOL_CALLS]name[ARGS]{arguments}`` of the given
  tools; a named choice ``{"type": "function", "function": {"name": ...}}``: calls of that function only;
* ``tool_choice="none"`` with tools: text only (no ``[TOOL_CALLS]``);
* ``response_format={"type": "json_object"}``: a JSON object or array; ``{"type": "json_schema", "json_schema":
  {"name": ..., "schema": {...}}}``: a JSON document valid under the schema.

Arguments and JSON answers are held to their schema whether or not the request says ``"strict": true`` (a
constrained answer that does not validate would defeat the point); ``additionalProperties`` is honoured as
written. JSON is written the way mistral-common writes tool arguments (``json.dumps``: ``", "`` and ``": "``,
no other whitespace), so a generated call re-encodes to the ids the model produced, and a model with random
weights cannot wander into whitespace forever.

mistral-common's `GrammarFactory` (llguidance) renders the grammar from the request; this module gives it its
template (below, after mistral-common's template for reasoning models), which differs in two ways: the
``[THINK]`` block is allowed only when reasoning is on (``reasoning_effort`` other than "none"), and a
required call comes first (no free text before it), so an answer under "required" is calls and nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.guidance.grammar_factory import GrammarFactory
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from pydantic import ValidationError

import jsonschema

from ..constrain import Grammar
from .tools import check_tool_choice, check_tools

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options (``x-guidance``): the separators of ``json.dumps``, no free whitespace."""

TEMPLATE = """\
{% if json_schema_str != None -%}
{% if json_only -%}
start: json_grammar
{% else -%}
start: body | json_grammar
{% endif -%}
json_grammar: THINK SAFE_WS? %json {{ json_schema_str }}
{% else -%}
start: body
{% endif -%}
{% if mode == "auto" -%}
body: THINK (content | content? fcalls)
{% elif mode == "required" -%}
body: THINK fcalls
{% elif mode == "none" -%}
body: THINK content
{% endif -%}
fcalls: {{ fcall }}
content: (/(.|\\n)+/)+
{% if begin_think_token -%}
think: {{ begin_think_token }} content {{ end_think_token }}
{% endif -%}
SAFE_WS: /[ \\t\\r\\n]{1,8}/
"""
"""Jinja template of the grammar (rendered by `GrammarFactory`); ``THINK`` becomes ``think?`` with reasoning on."""

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def check_response_format(response_format: Any) -> dict[str, Any] | None:
    """The response format in mistral-common's form, or None for text; ValueError naming the bad field."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, got "
                         f"{str(response_format)[:200]}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {JSON schema}}, got "
                         f"{str(spec)[:200]}")
    try:
        jsonschema.Draft7Validator.check_schema(spec["schema"])
    except jsonschema.SchemaError as e:
        raise ValueError(f"response_format.json_schema.schema is not a valid JSON schema: {e.message}") from None
    return {"type": "json_schema", "json_schema": {"name": str(spec.get("name") or "response"),
                                                   "schema": spec["schema"], "strict": True}}


def needs_grammar(tools: Any, tool_choice: Any, response_format: dict[str, Any] | None) -> bool:
    """Whether a (checked) request is constrained: see the module docstring."""
    return response_format is not None or (bool(tools) and tool_choice != "auto")


def factory(tokenizer: Any) -> GrammarFactory:
    """The tokenizer's `GrammarFactory` (built once: it maps the whole vocabulary for llguidance, ~1 s);
    ValueError for a tokenizer it does not support (Tekken v11+)."""
    built = getattr(tokenizer, "_grammar_factory", None)
    if built is None:
        mistral = tokenizer.mistral
        if mistral is None or not GrammarFactory.is_supported(mistral):
            raise ValueError(f"constrained decoding (tool_choice 'required' / 'none' / a named function, response_format) "
                             f"needs a Tekken tokenizer of version v11 or later; {tokenizer.path} is not one")
        built = tokenizer._grammar_factory = GrammarFactory(mistral)
    return built


def _strict_schema(schema: Any) -> dict[str, Any]:
    """A schema with the JSON style of `JSON_STYLE`; no schema = an object without properties."""
    schema = copy.deepcopy(schema) if schema else {"type": "object", "properties": {}, "additionalProperties": False}
    return {**schema, "x-guidance": JSON_STYLE}


def chat_grammar(tokenizer: Any, tools: Any, tool_choice: Any, response_format: Any, reasoning_effort: str | None,
                 parallel_tool_calls: bool = True) -> Grammar | None:
    """The grammar of a request (tools, tool_choice, response_format as `Mistral4.chat` takes them; checked here,
    ValueError naming the field), or None when unconstrained. reasoning_effort decides whether the answer may open
    with a ``[THINK]`` block (`Tokenizer.reasons`); parallel_tool_calls: False allows one call. ValueError for a combination
    mistral-common refuses (a JSON response format with a required tool call) or a schema llguidance cannot
    compile."""
    tools = check_tools(tools)
    tool_choice, response_format = check_tool_choice(tool_choice, tools), check_response_format(response_format)
    if not needs_grammar(tools, tool_choice, response_format):
        return None
    f = factory(tokenizer)
    strict_tools = None
    if tools:
        strict_tools = [{**t, "function": {**t["function"], "strict": True,
                                           "parameters": _strict_schema(t["function"].get("parameters"))}}
                        for t in tools]
    kwargs: dict[str, Any] = {"tool_choice": tool_choice, "parallel_tool_calls": bool(parallel_tool_calls)}
    if response_format is not None:
        rf = copy.deepcopy(response_format)
        rf.setdefault("json_schema", {"name": "response", "schema": {"anyOf": [{"type": "object"}, {"type": "array"}]}})
        rf["json_schema"]["schema"] = _strict_schema(rf["json_schema"]["schema"])
        rf["json_schema"]["strict"] = True
        rf["type"] = "json_schema"
        kwargs["response_format"] = rf
    think = "think?" if tokenizer.reasons(reasoning_effort) and f._get_optional_special_token_lark("[THINK]") else ""
    try:
        request = ChatCompletionRequest.from_openai([{"role": "user", "content": "-"}], tools=strict_tools, **kwargs)
        lark = f.get_grammar_for_chat_request(request, TEMPLATE.replace("THINK", think))
    except (MistralCommonException, ValidationError, AssertionError, ValueError) as e:
        raise ValueError(f"this request cannot be constrained: {' '.join(str(e).split())[:300]}") from None
    return Grammar(lark, f.llg_tokenizer)
