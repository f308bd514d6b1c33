"""Batch mode: chat requests from JSONL in, results to JSONL out (ids and order kept).

Each input line is one OpenAI-style request: {"id": ..., "messages": [...] (user messages may hold image parts:
{"type": "image_url", "image_url": {"url": path | file:// | data URI}}), optional "max_tokens" /
"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "reasoning_effort", "stop_token_ids"}.
Each output line: {"id", "reasoning", "content", "prompt_tokens", "completion_tokens", "finish_reason"}
or, for a line that could not be served, {"id", "error"} — one bad line never stops the batch.
Requests are grouped into device batches (mixed sampling settings share one compiled loop).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

from .generate import Request
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_FIELDS = {"id", "messages", "max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
           "reasoning_effort", "stop_token_ids", "model"}


@dataclasses.dataclass
class Parsed:
    id: Any
    prompt: list[int] | None = None
    request: Request | None = None
    stops: tuple[int, ...] = ()
    error: str | None = None


def parse_line(line: str, number: int, model: Any, defaults: dict[str, Any]) -> Parsed:
    """One JSONL line -> a tokenized request, or a `Parsed` with `error` saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Parsed(id=number, error=f"line {number}: not valid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return Parsed(id=number, error=f"line {number}: expected a JSON object")
    rid = obj.get("id", number)
    try:
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        opts = {**defaults, **{k: v for k, v in obj.items() if k in _FIELDS - {"id", "messages", "model"}}}
        max_new = int(opts.pop("max_tokens", None) or opts.pop("max_new_tokens", None) or defaults.get("max_new_tokens", 256))
        opts.pop("max_new_tokens", None)
        tok = model.require_tokenizer()
        if hasattr(model, "encode_chat"):  # images are decoded here: a bad image fails this line only
            prompt, images = model.encode_chat(messages, reasoning_effort=opts.get("reasoning_effort"))
        else:
            prompt, images = tok.encode_chat(messages, reasoning_effort=opts.get("reasoning_effort")), []
        if max(prompt) >= model.config.vocab_size:
            raise ValueError(f"the tokenizer produced ids up to {max(prompt)}, outside the model's vocabulary")
        sampling = SamplingParams(float(opts.get("temperature", 0.0)), int(opts.get("top_k", 0)),
                                  float(opts.get("top_p", 1.0)), float(opts.get("min_p", 0.0)))
        if max_new < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {max_new}")
        stops = tuple(opts.get("stop_token_ids") or (tok.eos_id,))
        return Parsed(rid, prompt, Request(prompt, max_new, sampling, int(opts.get("seed", 0)), tuple(images)), stops)
    except (ValueError, TypeError, KeyError) as e:
        return Parsed(id=rid, error=f"line {number}: {e}")


def run(model: Any, lines: list[str], defaults: dict[str, Any] | None = None, batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """Yield one result dict per non-empty input line, in input order."""
    from .chat import split_reasoning

    defaults = dict(defaults or {})
    parsed = [parse_line(line, i + 1, model, defaults) for i, line in enumerate(lines) if line.strip()]
    ok = [p for p in parsed if p.error is None]
    results: dict[int, dict[str, Any]] = {}
    # rows in one device batch must share stop ids; group by them, keep input order inside a group
    groups: dict[tuple[int, ...], list[Parsed]] = {}
    for p in ok:
        groups.setdefault(p.stops, []).append(p)
    for stops, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            try:
                gens = model.generator.generate([p.request for p in chunk], stops)
            except ValueError as e:  # e.g. too long for the cache: report per request
                for p in chunk:
                    results[id(p)] = {"id": p.id, "error": str(e)}
                continue
            for p, g in zip(chunk, gens):
                reasoning, content = split_reasoning(g.tokens, model.tokenizer)
                results[id(p)] = {"id": p.id, "reasoning": reasoning, "content": content,
                                  "prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.tokens),
                                  "finish_reason": g.finish_reason}
    for p in parsed:
        yield {"id": p.id, "error": p.error} if p.error is not None else results[id(p)]
