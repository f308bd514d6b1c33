"""Batch mode: chat requests from JSONL in, results to JSONL out (ids and order kept).

Each input line is one OpenAI-style request: {"id": ..., "messages": [...] (user messages may hold image parts:
{"type": "image_url", "image_url": {"url": path | file:// | data URI}}), optional "max_tokens" /
"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "reasoning_effort", "stop_token_ids", and for
function calling and JSON output "tools", "tool_choice", "parallel_tool_calls", "response_format" (as in
`Mistral4.chat`; the history may hold assistant "tool_calls" and "tool" messages)}.
Each output line: {"id", "reasoning", "content", "tool_calls", "prompt_tokens", "completion_tokens",
"finish_reason"} (finish_reason "tool_calls" when the answer calls tools; "error", with an "error" field, when a
call is malformed or a JSON answer was cut off) or, for a line that could not be served, {"id", "error"} — one
bad line never stops the batch. Constrained lines (tool_choice "required" / "none" / named, response_format)
share device batches with the others (`constrain`).

Two steps, so that a bad file is reported before a model is loaded:
`parse(lines, defaults)` checks every line without a model (JSON, field names and types, value ranges,
unique ids); `serve(model, parsed)` tokenizes the valid ones (a bad image, or a prompt + max tokens past
the model's window, fails its line only) and generates them in device batches (mixed sampling settings
share one compiled loop). A batch that generation refuses (ValueError, e.g. its cache does not fit the
devices' memory: `serve.memory`) is retried in halves, down to single requests, so only a request
refused on its own reports an error.

Ids: an explicit "id" is a string or an integer, unique in the file. A line without one (or one that is
not JSON) gets its line number, as a string when the file's explicit ids are strings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

from .chat import REASONING_EFFORTS
from .chat.grammar import chat_grammar, check_response_format
from .chat.session import chat_result
from .chat.tools import check_tool_choice, check_tools
from .generate import Request
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_SAMPLING = ("temperature", "top_k", "top_p", "min_p")
_TOOLING = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
_FIELDS = {"id", "messages", "max_tokens", "max_new_tokens", "seed", "reasoning_effort", "stop_token_ids", "model",
           *_SAMPLING, *_TOOLING}


@dataclasses.dataclass
class Parsed:
    """One non-blank input line: a checked request (not yet tokenized), or `error`."""

    id: Any
    line: int
    messages: list[dict[str, Any]] | None = None
    max_new_tokens: int = 0
    sampling: SamplingParams | None = None
    seed: int = 0
    reasoning_effort: str | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's eos; (): no stop token
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    error: str | None = None


def _int(obj: dict[str, Any], name: str, low: int, high: int | None = None) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name!r} must be an integer, got {value!r}")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name!r} must be {f'in [{low}, {high})' if high is not None else f'>= {low}'}, got {value}")
    return value


def _request(obj: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of one request object (ValueError naming the field otherwise)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
    if "max_tokens" in obj and "max_new_tokens" in obj:
        raise ValueError("give one of 'max_tokens' and 'max_new_tokens'")
    opts = {**defaults, **{k: v for k, v in obj.items() if v is not None}}
    limit = "max_tokens" if "max_tokens" in obj else "max_new_tokens"
    opts.setdefault(limit, defaults.get("max_new_tokens", 256))
    effort = opts.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ValueError(f"'reasoning_effort' must be one of {', '.join(map(repr, REASONING_EFFORTS))}, got {effort!r}")
    stops = opts.get("stop_token_ids")
    if stops is not None and (not isinstance(stops, list)
                              or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stops)):
        raise ValueError(f"'stop_token_ids' must be a list of token ids ([] = no stop token), got {stops!r}")
    sampling = SamplingParams(*(opts.get(k, getattr(SamplingParams, k)) for k in _SAMPLING))  # checks the ranges
    tools = check_tools(opts.get("tools"))
    parallel = opts.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ValueError(f"'parallel_tool_calls' must be true or false, got {parallel!r}")
    return dict(messages=messages, max_new_tokens=_int(opts, limit, 1), sampling=sampling,
                seed=_int(opts, "seed", 0, 2**32) if "seed" in opts else 0, reasoning_effort=effort,
                stop_token_ids=None if stops is None else tuple(stops), tools=tools,
                tool_choice=check_tool_choice(opts.get("tool_choice", "auto"), tools), parallel_tool_calls=parallel,
                response_format=check_response_format(opts.get("response_format")))


def parse(lines: list[str], defaults: dict[str, Any] | None = None, source: str = "input") -> list[Parsed]:
    """Check every non-blank line (no model needed); errors read "`source` line N: what is wrong"."""
    defaults = dict(defaults or {})
    objs: list[tuple[int, Any, str | None]] = []  # (line number, object, JSON error)
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                objs.append((number, json.loads(line), None))
            except json.JSONDecodeError as e:
                objs.append((number, None, f"not valid JSON ({e.msg})"))
    string_ids = any(isinstance(o, dict) and isinstance(o.get("id"), str) for _, o, _ in objs)
    out: list[Parsed] = []
    seen: dict[Any, int] = {}
    for number, obj, error in objs:
        rid = obj.get("id") if isinstance(obj, dict) else None
        if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
            if rid is not None and error is None:
                error = f"'id' must be a string or an integer, got {rid!r}"
            rid = str(number) if string_ids else number
        if error is None and rid in seen:
            error = f"id {rid!r} is already used by line {seen[rid]}"
        seen.setdefault(rid, number)
        p = Parsed(rid, number, error=error)
        if error is None:
            try:
                p = Parsed(rid, number, **_request(obj, defaults))
            except ValueError as e:
                p.error = str(e)
        if p.error is not None:
            p.error = f"{source} line {number}: {p.error}"
        out.append(p)
    return out


def serve(model: Any, parsed: list[Parsed], batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """Tokenize and generate the valid requests; yield one result per `parsed` entry, in order."""
    tok = model.require_tokenizer()
    results: dict[int, dict[str, Any]] = {}
    # rows in one device batch must share stop ids; group by them, keep input order inside a group
    groups: dict[tuple[int, ...], list[tuple[int, Request]]] = {}
    for i, p in enumerate(parsed):
        if p.error is not None:
            results[i] = {"id": p.id, "error": p.error}
            continue
        try:
            prompt, images = model.encode_chat(p.messages, reasoning_effort=p.reasoning_effort, tools=p.tools,
                                               tool_choice=p.tool_choice)  # decodes images
            grammar = chat_grammar(tok, p.tools, p.tool_choice, p.response_format, p.reasoning_effort,
                                   p.parallel_tool_calls)
            if max(prompt) >= model.config.vocab_size:
                raise ValueError(f"the tokenizer produced ids up to {max(prompt)}, outside the model's vocabulary")
            window = model.config.max_length
            if window is not None and len(prompt) + p.max_new_tokens > window:
                raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                                 f"model's window (max_position_embeddings {window})")
            stops = (tok.eos_id,) if p.stop_token_ids is None else p.stop_token_ids
        except (ValueError, TypeError, KeyError, OSError) as e:
            results[i] = {"id": p.id, "error": f"line {p.line}: {e}"}
            continue
        groups.setdefault(stops, []).append((i, Request(prompt, p.max_new_tokens, p.sampling, p.seed, tuple(images),
                                                        grammar)))
    for stops, members in groups.items():
        for start in range(0, len(members), batch_size):
            for i, g in _generate(model, members[start:start + batch_size], stops):
                if isinstance(g, ValueError):
                    results[i] = {"id": parsed[i].id, "error": f"line {parsed[i].line}: {g}"}
                    continue
                r = chat_result(tok, g, json_answer=parsed[i].response_format is not None)
                results[i] = {"id": parsed[i].id, "reasoning": r.reasoning, "content": r.content,
                              "tool_calls": r.tool_calls, "prompt_tokens": r.prompt_tokens,
                              "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason}
                if r.error is not None:
                    results[i]["error"] = r.error
    for i in range(len(parsed)):
        yield results[i]


def _generate(model: Any, rows: list[tuple[int, Request]], stops: tuple[int, ...]) -> list[tuple[int, Any]]:
    """(index, its `Generation` or the ValueError that refused it) for (index, request) `rows` generated
    together; a batch refused as a whole is retried in halves, down to single requests."""
    try:
        gens = model.generator.generate([r for _, r in rows], stops)
    except ValueError as e:
        if len(rows) == 1:
            return [(rows[0][0], e)]
        log.info("a batch of %d requests was refused (%s); retrying in halves", len(rows), e)
        half = len(rows) // 2
        return _generate(model, rows[:half], stops) + _generate(model, rows[half:], stops)
    return [(i, g) for (i, _), g in zip(rows, gens)]


def run(model: Any, lines: list[str], defaults: dict[str, Any] | None = None, batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """Yield one result dict per non-blank input line, in input order (`serve` of `parse`)."""
    return serve(model, parse(lines, defaults), batch_size)
