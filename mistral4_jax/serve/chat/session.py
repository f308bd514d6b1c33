"""Chat results, and multi-turn chat that keeps the conversation's latent KV cache between turns.

    chat = model.chat_session(system="Be brief.", max_new_tokens=256)
    chat.send("Is 97 prime?").content
    chat.send("And 91?").content        # prefills only the new turn, reuses the compiled functions

Each turn encodes the whole conversation with the tokenizer (mistral-common's ids: exactly what
`model.chat(chat.messages + [message])` would encode), compares those ids with the ones whose keys and
values sit in the cache (the previous prompt + the answer's tokens fed back), and prefills from the first
token that differs, in chunks of `prefill_chunk` tokens at an offset into the cache (`Generator.extend`).
Normally that is just the new turn: the previous answer's end token, then `[INST]...[/INST]`. When the
re-encoded history differs from what was generated (an answer whose text does not tokenize back to the
same ids, a reasoning trace rendered differently), the turn re-prefills from the first differing token,
so the answer is always the one a fresh prefill of the encoded history gives.

Shapes, and so compilations: the chunk size is fixed, and the cache is allocated at a power of two of
slots (≥ `min_cache`) and grown to the next one by copying when a turn would overflow it; every turn
therefore reuses one chunk-prefill and one decode program per cache size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...distributed import to_host
from ..constrain import Masks
from ..generate import Generation, Request, Stream, bucket, prefill_bar
from ..sampling import SamplingParams
from .grammar import chat_grammar, check_response_format
from .tools import check_tools, parse_answer

if TYPE_CHECKING:
    from ...api import Mistral4

PREFILL_CHUNK = 128
"""Tokens per chunk-prefill call of a chat turn (the last chunk is padded): one compiled shape for every turn
(a turn longer than `Mistral4.prefill_chunk` goes in chunks of that size instead)."""

MIN_CACHE = 256
"""Smallest cache (slots) of a chat session; it grows by powers of two."""


@dataclasses.dataclass
class ChatResult:
    """One chat answer: the reasoning (between [THINK] and [/THINK]), the content (the text outside the
    reasoning and the tool calls), the tool calls (OpenAI shape: ``{"id", "type": "function", "function":
    {"name", "arguments": JSON string}}``), finish_reason ("stop", "length", "tool_calls", or "error" with
    `error` saying which call text is malformed). `cached_tokens`: prompt tokens whose keys and values were
    reused from the cache (a chat session's earlier turns) rather than prefilled."""

    reasoning: str
    content: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int]
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: str | None = None
    cached_tokens: int = 0


def chat_result(tokenizer: Any, generation: Any, json_answer: bool = False, cached_tokens: int = 0) -> ChatResult:
    """A `generate.Generation` of a chat prompt, parsed (`tools.parse_answer`) into a `ChatResult`.
    json_answer: the request asked for a JSON answer (response_format), so one cut off by max_new_tokens is
    an error too."""
    g = generation
    a = parse_answer(tokenizer, g.tokens, "stop" if g.finish_reason == "error" else g.finish_reason)
    finish, error = a.finish_reason, a.error
    if g.finish_reason == "error":
        finish, error = "error", g.error
    elif json_answer and finish == "length":
        finish, error = "error", f"the JSON answer was cut off by max_new_tokens ({len(g.tokens)} tokens)"
    return ChatResult(a.reasoning, a.content, g.prompt_tokens, len(g.tokens), finish, list(g.tokens), a.tool_calls,
                      error, cached_tokens)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n


class ChatSession:
    """One conversation with a model, its latent cache kept between turns (see the module docstring).

    `messages`: the conversation so far (system prompt, then user/assistant turns; answers carry their
    reasoning as `reasoning_content` and their calls as `tool_calls`). `send(message)` answers one user message
    (a string, or an OpenAI-style message dict, which may hold image parts) or tool results (a `tool` message
    dict with its `tool_call_id`, or a list of them for several calls) and returns a `ChatResult`. tools,
    tool_choice, parallel_tool_calls and response_format apply to every turn, as in `Mistral4.chat`; `stream(message)`
    yields the answer's token ids chunk by chunk (a `Stream`, whose `result` is then the `ChatResult`). Sampling settings apply to every
    turn; each turn samples with `seed`, as `model.chat(messages, seed=seed)` would. `stop_token_ids`:
    default the tokenizer's eos; [] = no stop token (turns end at `max_new_tokens`). `reset()` starts over.
    """

    def __init__(self, model: Mistral4, system: str | None = None, reasoning_effort: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, min_cache: int = MIN_CACHE, tools: Any = None,
                 tool_choice: Any = "auto", response_format: Any = None, parallel_tool_calls: bool = True) -> None:
        self.model = model
        self.tokenizer = model.require_tokenizer()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        if prefill_chunk < 1 or min_cache < 1:
            raise ValueError(f"prefill_chunk and min_cache must be ≥ 1, got {prefill_chunk} and {min_cache}")
        self.tokenizer.encode_chat([{"role": "user", "content": "x"}], reasoning_effort=reasoning_effort, tools=tools,
                                   tool_choice=tool_choice)  # validates
        self.reasoning_effort = reasoning_effort
        self.tools, self.tool_choice = check_tools(tools), tool_choice
        self.grammar = chat_grammar(self.tokenizer, tools, tool_choice, response_format, reasoning_effort,
                                    parallel_tool_calls)
        self.json_answer = check_response_format(response_format) is not None
        self.request = Request((), max_new_tokens, SamplingParams(temperature, top_k, top_p, min_p), seed)
        self.stop_token_ids = (self.tokenizer.eos_id,) if stop_token_ids is None else tuple(int(i) for i in stop_token_ids)
        self.prefill_chunk, self.min_cache = prefill_chunk, min_cache
        self._base = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, Any]] = list(self._base)
        self._cache: dict[str, Any] | None = None
        self._cached: list[int] = []  # the ids whose keys/values fill cache slots 0..len-1
        self._features: dict[str, np.ndarray] = {}  # image features [rows, D] by pixel digest

    def reset(self) -> None:
        """Forget the conversation (back to the system prompt); the cache's memory is kept for reuse."""
        self.messages = list(self._base)
        self._cached = []
        self._features = {}

    def send(self, message: str | dict[str, Any] | list[dict[str, Any]]) -> ChatResult:
        """Answer one user message, or tool results (and add them and the answer to `messages`)."""
        stream = self.stream(message)
        for _ in stream:
            pass
        return stream.result

    def stream(self, message: str | dict[str, Any] | list[dict[str, Any]], chunk: int = 8) -> Stream:
        """A `Stream` of the answer's new token ids after the prefill and after every `chunk` decode steps (stop
        token dropped); once exhausted, its `result` is the `ChatResult` and `messages` holds the two new turns."""
        return Stream(self._stream(message, chunk))

    def _stream(self, message: str | dict[str, Any] | list[dict[str, Any]], chunk: int) -> Iterator[list[int]]:
        """`stream`'s chunks; its return value (`StopIteration.value`) is the `ChatResult`."""
        model, gen = self.model, self.model.generator
        cfg, c = model.config, self.prefill_chunk
        new = [{"role": "user", "content": message}] if isinstance(message, str) else \
            [dict(m) for m in message] if isinstance(message, (list, tuple)) else [dict(message)]
        messages = self.messages + new
        ids, images = model.encode_chat(messages, reasoning_effort=self.reasoning_effort, tools=self.tools,
                                        tool_choice=self.tool_choice)
        if max(ids) >= cfg.vocab_size:
            raise ValueError(f"the tokenizer produced ids up to {max(ids)}, outside the model's vocabulary ({cfg.vocab_size})")
        max_new = self.request.max_new_tokens
        if len(ids) + max_new > cfg.max_position_embeddings:
            raise ValueError(f"the conversation ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        keep = min(common_prefix(ids, self._cached), len(ids) - 1) if self._cache is not None else 0
        if len(ids) - keep > max(c, model.prefill_chunk):  # a long turn: the model's (larger) prompt chunks
            c = model.prefill_chunk
        need = max(keep + -(-(len(ids) - keep) // c) * c, len(ids) + max_new)
        size = min(bucket(need, self.min_cache), max(need, cfg.max_position_embeddings))
        features = self._image_features(ids, images)
        cache, self._cache, self._cached = self._cache, None, []  # consumed below; a failed turn starts over
        if cache is None:
            cache = gen.new_cache(1, size)
        elif size > cache.slots:
            cache = gen.grow(cache, size)
        settings = gen.settings([self.request], self.stop_token_ids)
        masks = Masks([self.grammar], cfg.vocab_size)
        allowed = masks.fill() if masks.active else None
        tokens = np.zeros((1, bucket(max_new)), np.int32)
        img = model.vision_config.image_token_index if model.has_vision else -1
        state: Any = None
        with prefill_bar(model, len(ids) - keep, -(-(len(ids) - keep) // c)) as bar:
            for start in range(keep, len(ids), c):
                part = ids[start:start + c]
                chunk_ids = np.full((1, c), cfg.pad_token_id, np.int32)
                chunk_ids[0, :len(part)] = part
                feats = None
                if features is not None and img in part:
                    first = sum(1 for t in ids[:start] if t == img)
                    rows = features[first:first + sum(1 for t in part if t == img)]
                    feats = np.pad(rows, ((0, c - len(rows)), (0, 0)))
                state = gen.extend(cache, chunk_ids, len(part), start, tokens, settings, feats, allowed)
                cache = state.cache
                bar.update(len(part))
        steps = gen.follow(state, [self.request], settings, chunk, masks)
        while True:
            try:
                yield next(steps)[0]
            except StopIteration as end:
                rows, stopped, state = end.value
                break
        answer = rows[0]
        self._cache = state.cache
        self._cached = list(ids) + (answer if stopped[0] else answer[:-1])  # the last token sampled is not fed
        finish = "error" if masks.errors[0] else "stop" if stopped[0] else "length"
        result = chat_result(self.tokenizer, Generation(answer, finish, len(ids), masks.errors[0]), self.json_answer, keep)
        reply: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.reasoning:
            reply["reasoning_content"] = result.reasoning
        if result.tool_calls:
            reply["tool_calls"] = result.tool_calls
        self.messages = messages + [reply]
        return result

    def _image_features(self, ids: list[int], images: list[Any]) -> np.ndarray | None:
        """Features [M, D] of the conversation's images in `[IMG]` order (None without images); each image
        goes through the vision tower once per session."""
        if not images:
            return None
        out = []
        for image in images:
            key = hashlib.sha1(np.ascontiguousarray(image.pixel_values).tobytes()).hexdigest()
            if key not in self._features:
                self._features[key] = to_host(self.model.image_features([image]))
            out.append(self._features[key])
        return np.concatenate(out)
