"""Chat requests -> prompt ids, through mistral-common only; the reasoning split of an answer.

`encode_request` checks OpenAI-style messages (one-line errors naming ``messages[i]``), builds
mistral-common's ``ChatCompletionRequest.from_openai`` (messages, tools, tool_choice, reasoning_effort)
and encodes it with ``MistralTokenizer.encode_chat_completion``, so the ids are mistral-common's for every
message mix: system, user, assistant (with reasoning, thinking parts or tool calls), tool results.

Chat format of Mistral Small 4 (mistral-common tokenizer v15; one line in reality)::

    <s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][AVAILABLE_TOOLS][{"type": "function", "function": {...}}]
    [/AVAILABLE_TOOLS][MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]user[/INST]
    [THINK]reasoning[/THINK]text[TOOL_CALLS]name[ARGS]{"arg": 1}</s>[TOOL_RESULTS]result[/TOOL_RESULTS]
    answer</s>[INST]next user[/INST]

``[AVAILABLE_TOOLS]`` and ``[MODEL_SETTINGS]`` precede the first user message; consecutive messages of
one role are merged ("\\n\\n" between texts); tool results follow the order of the calls; call ids are
not encoded (v13+) but must pair calls with results. ``reasoning_effort`` is "none" (the builder's
default) or "high"; the model writes its reasoning between ``[THINK]`` and ``[/THINK]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import ValidationError

from .tools import check_tool_choice, check_tools

BEGIN_THINK = "[THINK]"
END_THINK = "[/THINK]"
REASONING_EFFORTS = ("none", "high")
"""reasoning_effort values of Mistral Small 4 (its tekken.json's model_settings_builder)."""

IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image", "image_base64", "image_file"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def has_image_parts(messages: Any) -> bool:
    """Whether any message content holds an image part (`image_url`, `image`, ...)."""
    if not isinstance(messages, (list, tuple)):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), (list, tuple))
               and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in m["content"])
               for m in messages)


def check_messages(messages: Any, allow_images: bool = False) -> None:
    """Shape checks before mistral-common sees the messages: a non-empty list of dicts with a known
    ``role``; content a string, None or a list of typed parts; tool calls a list; a tool_call_id on tool
    messages; image parts -> ValueError unless `allow_images`. Everything else (order, pairing of calls and results) is mistral-common's."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with a 'role', got {msg!r}")
        if msg["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {msg['role']!r} (expected one of {sorted(ROLES)})")
        calls = msg.get("tool_calls")
        if calls is not None and (msg["role"] != "assistant" or not isinstance(calls, (list, tuple))):
            raise ValueError(f"messages[{i}].tool_calls must be a list, on an assistant message")
        if msg["role"] == "tool" and not (isinstance(msg.get("tool_call_id"), str) and msg["tool_call_id"]):
            raise ValueError(f"messages[{i}]: a tool message needs a 'tool_call_id' (the id of the call it answers)")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError(f"messages[{i}].content[{j}] must be a dict with a 'type', got {part!r}")
            if part["type"] in IMAGE_PART_TYPES and not allow_images:
                raise ValueError(
                    f"messages[{i}].content[{j}] is an image part ({part['type']!r}): encode_chat returns ids only; "
                    "use encode_chat_with_images (or Mistral4.chat) for messages with images")


def build_request(messages: Sequence[dict[str, Any]], reasoning_effort: str | None = None,
                  continue_final_message: bool = False, tools: Any = None,
                  tool_choice: Any = "auto") -> ChatCompletionRequest:
    """mistral-common's request for checked messages; tools and tool_choice are checked here (`tools.py`).

    reasoning_effort: None (the tokenizer's default) or a value the caller has validated."""
    tools = check_tools(tools)
    kwargs: dict[str, Any] = {"tool_choice": check_tool_choice(tool_choice, tools)}
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort
    try:
        return ChatCompletionRequest.from_openai([dict(m) for m in messages], tools=tools,
                                                 continue_final_message=continue_final_message, **kwargs)
    except (MistralCommonException, ValidationError, AssertionError, TypeError, KeyError, ValueError) as e:
        raise ValueError(f"invalid chat request: {type(e).__name__}: {_one_line(e)}") from None


def encode_request(mistral: MistralTokenizer, request: ChatCompletionRequest) -> list[int]:
    """``encode_chat_completion(request).tokens``; mistral-common's validation errors become ValueError."""
    try:
        return [int(i) for i in mistral.encode_chat_completion(request).tokens]
    except (MistralCommonException, ValidationError, AssertionError, TypeError, KeyError, ValueError) as e:
        raise ValueError(f"invalid chat request: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:500]


# ----------------------------------------------------------------------------------- reasoning split
def think_span(items: Sequence[Any], begin: Any, end: Any) -> tuple[int, int]:
    """(index of the first `begin`, index of the first `end` after it), -1 where absent; works on token
    ids (begin/end ids) and on strings (begin/end substrings)."""
    if isinstance(items, str):
        b = items.find(begin)
        return b, items.find(end, b + len(begin) if b >= 0 else 0)
    b = next((i for i, t in enumerate(items) if t == begin), -1)
    e = next((i for i in range(b + 1, len(items)) if items[i] == end), -1)
    return b, e


def split_reasoning(output: str | Sequence[int], tokenizer: Any = None) -> tuple[str, str]:
    """Split a model output into ``(reasoning, content)``.

    ``output``: text decoded WITH special tokens (``decode(ids, skip_special=False)``), or token ids
    (then ``tokenizer`` is required; see `Tokenizer.split_reasoning`).

    Rules: reasoning is what lies between the first ``[THINK]`` and the next ``[/THINK]``; content is
    everything else (text before ``[THINK]`` + text after ``[/THINK]``), not stripped. No tags:
    ``("", output)``. ``[THINK]`` without ``[/THINK]`` (generation stopped while reasoning): all of it
    is reasoning, content is what came before ``[THINK]`` (usually ""). ``[/THINK]`` without
    ``[THINK]`` (the prompt itself opened the block): what precedes it is reasoning.
    """
    if not isinstance(output, str):
        if tokenizer is None:
            raise ValueError("split_reasoning on token ids needs the tokenizer")
        return tokenizer.split_reasoning(output)
    return split_think(output, *think_span(output, BEGIN_THINK, END_THINK), len(BEGIN_THINK), len(END_THINK))


def split_think(items: Sequence[Any], b: int, e: int, nb: int = 1, ne: int = 1) -> tuple[Any, Any]:
    """(reasoning, content) slices of `items` for a `think_span` (b, e); nb/ne: lengths of the tags."""
    if b < 0 and e < 0:
        return items[:0], items
    if b < 0:
        return items[:e], items[e + ne:]
    if e < 0:
        return items[b + nb:], items[:b]
    return items[b + nb:e], items[:b] + items[e + ne:]
