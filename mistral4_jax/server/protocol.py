"""The OpenAI wire format: request bodies (pydantic), their translation into engine requests, and the answers
and stream chunks built from the engine's tokens.

Fields this server does not implement are refused when set to anything but their neutral value (`n` > 1,
`logprobs`, penalties, `logit_bias`), so a client never silently gets something other than it asked for;
fields it does not know are ignored, as OpenAI's own clients send some (`user`, `metadata`, ...).
The reasoning trace (between ``[THINK]`` and ``[/THINK]``) is returned as `reasoning_content`, beside
`content`, in answers and in stream deltas.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..serve.chat.tools import TOOL_CALLS


class APIError(Exception):
    """An error answered with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and completions requests share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> None:
        """APIError for a field set to something this server does not do."""
        for name, neutral in (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if getattr(self, name) != neutral:
                raise APIError(400, f"{name}={getattr(self, name)!r} is not supported by this server (only {neutral})", name)
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server", "logprobs")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", "stop")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    reasoning_effort: Literal["none", "high"] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class StopStrings:
    """Text streamed so far, cut at the first stop string; `feed` returns the text that is safe to show (a
    possible beginning of a stop string is held back until it is decided)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.shown, self.hit = stops, "", 0, False

    def feed(self, text: str, final: bool = False) -> str:
        if self.hit:
            return ""
        self.text += text
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.text = True, self.text[:cut]
            end = cut
        elif final or not self.stops:
            end = len(self.text)
        else:  # hold back what could still become a stop string
            hold = max(len(s) for s in self.stops) - 1
            end = max(self.shown, len(self.text) - hold)
        out, self.shown = self.text[self.shown:end], max(self.shown, end)
        return out


class ChatDeltas:
    """A chat answer's tokens, as they are generated, split into `reasoning_content` and `content` text
    (the ``[THINK]`` block, the rest); tool calls (from ``[TOOL_CALLS]`` on) are not streamed as text: they
    come parsed in the last chunk. Stop strings apply to the content."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.think = tokenizer.think_ids or (None, None)
        self.calls = tokenizer.token_id(TOOL_CALLS) if tokenizer.mistral is not None else None
        self.field = "content"
        self.decoders = {"content": tokenizer.incremental_decoder(), "reasoning_content": tokenizer.incremental_decoder()}
        self.stop = StopStrings(stops)

    def feed(self, ids: list[int], final: bool = False) -> list[tuple[str, str]]:
        """(field, text) pieces the new ids complete."""
        out: list[tuple[str, str]] = []

        def add(field: str, text: str) -> None:
            if field == "content":
                text = self.stop.feed(text)
            if text:
                out.append((field, text))

        for t in ids:
            new = {self.think[0]: "reasoning_content", self.think[1]: "content", self.calls: "calls"}.get(t)
            if new is not None and new != self.field:
                if self.field in self.decoders:
                    add(self.field, self.decoders[self.field].flush())
                self.field = new
                continue
            if self.field in self.decoders:
                add(self.field, self.decoders[self.field].feed(t))
        if final:
            if self.field in self.decoders:
                add(self.field, self.decoders[self.field].flush())
            add("content", self.stop.feed("", final=True))
        return out


class TextDeltas:
    """A completion's tokens as text pieces ("text", text), cut at the first stop string (none without a
    tokenizer: token ids only)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.decoder = tokenizer.incremental_decoder() if tokenizer is not None else None
        self.stop = StopStrings(stops)

    def feed(self, ids: list[int], final: bool = False) -> list[tuple[str, str]]:
        if self.decoder is None:
            return []
        text = self.stop.feed(self.decoder.feed(ids) + (self.decoder.flush() if final else ""), final)
        return [("text", text)] if text else []


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def now() -> int:
    return int(time.time())


__all__ = ["APIError", "ChatCompletionRequest", "ChatDeltas", "CompletionRequest", "StopStrings", "TextDeltas",
           "chat_chunk", "completion_chunk", "new_id", "now", "usage"]
