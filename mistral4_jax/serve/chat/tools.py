"""Function calling: checks of `tools` / `tool_choice`, and the parse of an answer into reasoning,
content and tool calls.

Tools are OpenAI-style function definitions::

    {"type": "function", "function": {"name": "get_weather", "description": "...",
                                      "parameters": {JSON schema of the arguments}}}

mistral-common encodes them (`format.py`); they are checked here first, each error naming ``tools[i]``:
the name as mistral-common requires it (1-64 of ``a-zA-Z0-9_-``) and unique, ``parameters`` a valid
JSON schema (Draft 7, the check mistral-common runs). ``tool_choice``: "auto", "none", "required" or
``{"type": "function", "function": {"name": ...}}`` naming one of the tools.

An answer with calls reads (v13+) ``[THINK]...[/THINK]text[TOOL_CALLS]name[ARGS]{json}[TOOL_CALLS]...``
(v11: ``name[CALL_ID]id[ARGS]{json}``; v2-v7: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``).
`parse_answer` cuts it with mistral-common's own decoders (``mistral_common.experimental.tools``, which
its reference server uses to turn generated ids back into an ``AssistantMessage``) and returns the calls
in the OpenAI shape ``{"id", "type": "function", "function": {"name", "arguments": JSON string}}``.
v13+ does not generate call ids: each call gets a deterministic 9-character id (letters and digits, as
Mistral's API uses) derived from the answer's ids and the call's index. ``arguments`` is
``json.dumps(arguments, ensure_ascii=False)``: for an answer in the form mistral-common writes calls in
the history, the very text the model generated after ``[ARGS]``; sent back in the history, the parsed
answer re-encodes to the ids the model generated.
A malformed call (no ``[ARGS]``, arguments that are not a JSON object, a call cut off by
max_new_tokens) is never raised: the answer gets ``finish_reason="error"`` and ``error`` says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from collections.abc import Sequence
from typing import Any

import jsonschema
from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls
from pydantic import ValidationError

TOOL_CALLS = "[TOOL_CALLS]"
TOOL_CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_CHARS = string.ascii_letters + string.digits


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """`tools` as given (a list of dicts), or None; ValueError naming ``tools[i]`` for a bad definition."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts, "
                         f"got {type(tools).__name__}")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function"
                and isinstance(tool.get("function"), dict)):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                             f"{{...}}}}}}, got {str(tool)[:200]}")
        name, params = tool["function"].get("name"), tool["function"].get("parameters")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise ValueError(f"{where}: a second tool named {name!r}")
        names.add(name)
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{where} ({name}): parameters must be a JSON schema object, got {type(params).__name__}")
        try:
            jsonschema.Draft7Validator.check_schema(params or {})
        except jsonschema.SchemaError as e:
            raise ValueError(f"{where} ({name}): parameters are not a valid JSON schema: {e.message}") from None
    return list(tools)


def check_tool_choice(tool_choice: Any, tools: Sequence[dict[str, Any]] | None) -> str | dict[str, Any]:
    """`tool_choice` in the form mistral-common takes; ValueError for an unknown value or function name."""
    names = [t["function"]["name"] for t in tools or ()]
    if isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES:
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice='required' needs tools")
        return tool_choice
    if (isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
            and isinstance(tool_choice.get("function"), dict)):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(names) or 'no tools given'})")
        return {"type": "function", "function": {"name": name}}
    raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}, got {tool_choice!r}")


@dataclasses.dataclass
class Answer:
    """One generated answer, parsed: reasoning ([THINK] block), content (the text outside the reasoning and
    the calls), tool calls (OpenAI shape), finish_reason ("stop", "length", "tool_calls" or "error") and,
    for "error", what is malformed."""

    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    error: str | None = None


def parse_answer(tokenizer: Any, ids: Sequence[int], finish_reason: str) -> Answer:
    """Parse generated ids (without the stop token) of a `chat.Tokenizer`; finish_reason: the generator's
    ("stop" or "length"). Calls that parse give finish_reason "tool_calls" (when the answer stopped)."""
    ids = [int(i) for i in ids]
    reasoning_ids, rest = tokenizer.split_reasoning_ids(ids)
    calls_id = tokenizer.token_id(TOOL_CALLS) if tokenizer.mistral is not None else None
    segments: Sequence[list[int]] = ()
    if calls_id is not None and calls_id in rest:
        rest, segments = _split_content_and_tool_calls(rest, calls_id)
    reasoning, content = tokenizer.decode(reasoning_ids), tokenizer.decode(rest)
    calls: list[dict[str, Any]] = []
    for k, segment in enumerate(segments):
        try:
            decoded = _decode_tool_calls([segment], tokenizer.mistral.instruct_tokenizer.tokenizer)
            for call in decoded:
                calls.append(_openai_call(call, ids, len(calls)))
        except (ValueError, ValidationError) as e:
            why = "the arguments are not a JSON object" if isinstance(e, ValidationError) else " ".join(str(e).split())
            cut = " (the answer was cut off by max_new_tokens)" if finish_reason == "length" else ""
            text = tokenizer.decode(segment, skip_special=False)
            return Answer(reasoning, content, calls, "error", f"tool call {k}: {why[:300]}{cut}; its text: {text[:200]!r}")
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return Answer(reasoning, content, calls, finish_reason)


def _openai_call(call: Any, ids: list[int], index: int) -> dict[str, Any]:
    """A mistral-common `ToolCall` -> ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    name = call.function.name.strip()  # a grammar allows whitespace around the name
    if not name:
        raise ValueError("no function name before [ARGS]")
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of {name!r} are not a JSON object")
    call_id = call.id if call.id and call.id != "null" else _call_id(ids, index)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _call_id(ids: list[int], index: int) -> str:
    """9 letters/digits from a hash of the answer's ids and the call's index (same answer, same ids)."""
    digest = hashlib.sha256(f"{index}:{ids}".encode()).digest()
    return "".join(_ID_CHARS[b % len(_ID_CHARS)] for b in digest[:9])
