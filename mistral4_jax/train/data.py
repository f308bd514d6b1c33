"""Training data: OpenAI-style chat conversations (JSONL) encoded with mistral-common, labels on assistant tokens
only, packed into fixed-length rows, served in a fixed order that depends only on the step (so a resumed run
sees the same batches).

    examples, report = read_conversations("train.jsonl", tokenizer, seq_len=512)
    rows = pack(examples, seq_len=512)                    # {"input_ids", "labels", "attention_mask"} [N, T]
    batch = batch_at(rows, step, batch=8, accum=2, seed=0) # [A, B, T] each

A line is {"messages": [...], "tools": [...] (optional), "reasoning_effort": "none" | "high" (optional; default
"high" when an assistant message carries reasoning, else the tokenizer's default)}.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..model.loss import IGNORE_INDEX
from ..serve.chat.format import build_request, check_messages, encode_request, has_image_parts


@dataclasses.dataclass
class Example:
    """One encoded conversation: ids and labels (IGNORE_INDEX where nothing is learned), of equal length."""

    ids: list[int]
    labels: list[int]
    line: int = 0


def _finetuning_tokenizer(tok: Any) -> Any:
    """mistral-common's tokenizer for `tok`'s tekken.json in finetuning mode (the last message is the assistant's,
    ended with </s>)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if getattr(tok, "mistral", None) is None:
        raise ValueError("fine-tuning data are chat conversations: the checkpoint needs a tekken.json tokenizer")
    if getattr(tok, "_finetuning", None) is None:
        tok._finetuning = MistralTokenizer.from_file(str(tok.path), mode=ValidationMode.finetuning)
    return tok._finetuning


def encode_conversation(tok: Any, messages: Sequence[dict[str, Any]], reasoning_effort: str | None = None,
                        tools: Any = None) -> Example:
    """The conversation's ids (mistral-common, as the chat format sends it) and labels: each assistant turn's tokens
    (its reasoning, content or tool calls and the closing </s>) are learned, everything else is IGNORE_INDEX.
    An assistant turn is located as the tokens after the prompt that precedes it (`tok.encode_chat` of the
    messages before it); a turn whose prompt is not a prefix of the full encoding is not learned.
    ValueError: not a conversation, images, or no assistant message at the end."""
    check_messages(messages)
    if has_image_parts(messages):
        raise ValueError("image parts are not supported in fine-tuning data")
    if messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation must end with an assistant message (nothing to learn after it)")
    if reasoning_effort is None and any(m.get("role") == "assistant" and (m.get("reasoning_content") or m.get("reasoning"))
                                        for m in messages):
        reasoning_effort = "high"
    ft = _finetuning_tokenizer(tok)
    full = encode_request(ft, build_request(messages, reasoning_effort, tools=tools))
    labels = [IGNORE_INDEX] * len(full)
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = tok.encode_chat(list(messages[:k]), reasoning_effort=reasoning_effort, tools=tools)
        turn = encode_request(ft, build_request(messages[:k + 1], reasoning_effort, tools=tools))
        if full[:len(turn)] != turn or turn[:len(prompt)] != prompt:
            continue
        labels[len(prompt):len(turn)] = turn[len(prompt):]
    return Example(full, labels)


def read_conversations(path: str, tok: Any, seq_len: int, long: str = "truncate") -> tuple[list[Example], dict[str, Any]]:
    """Encode every line of a JSONL file. Returns (examples, report): report["errors"] lists {"line", "error"}
    for lines that are not conversations or have nothing to learn; sequences longer than `seq_len` are cut to it
    (`long="truncate"`) or left out (`"drop"`), counted in report["truncated"] / report["dropped"]."""
    if long not in ("truncate", "drop"):
        raise ValueError(f"long must be 'truncate' or 'drop', got {long!r}")
    examples: list[Example] = []
    report: dict[str, Any] = {"lines": 0, "errors": [], "truncated": 0, "dropped": 0, "tokens": 0, "learned_tokens": 0}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            report["lines"] += 1
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                    raise ValueError('expected an object {"messages": [...]}')
                ex = encode_conversation(tok, record["messages"], record.get("reasoning_effort"), record.get("tools"))
            except (ValueError, json.JSONDecodeError) as e:
                report["errors"].append({"line": n, "error": " ".join(str(e).split())[:300]})
                continue
            if len(ex.ids) > seq_len:
                if long == "drop":
                    report["dropped"] += 1
                    continue
                ex = Example(ex.ids[:seq_len], ex.labels[:seq_len])
                report["truncated"] += 1
            learned = sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)  # shifted: the first token is never predicted
            if learned == 0:
                report["errors"].append({"line": n, "error": "no assistant tokens to learn from (within seq_len)"})
                continue
            ex.line = n
            examples.append(ex)
            report["tokens"] += len(ex.ids)
            report["learned_tokens"] += learned
    return examples, report


def pack(examples: Sequence[Example], seq_len: int, packing: bool = True, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of `seq_len` tokens, right-padded: with `packing`, conversations in order fill a row while they fit
    (first fit over the open row only, so the order is kept); without, one conversation per row.
    -> {"input_ids", "labels", "attention_mask"} int32 [N, seq_len]. Packed conversations share a row's causal
    attention (no per-conversation mask), as plain packing does."""
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        if packing and rows and len(rows[-1][0]) + len(ex.ids) <= seq_len:
            rows[-1][0].extend(ex.ids)
            rows[-1][1].extend(ex.labels)
        else:
            rows.append((list(ex.ids), list(ex.labels)))
    n = len(rows)
    out = {"input_ids": np.full((n, seq_len), pad_id, np.int32), "labels": np.full((n, seq_len), IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros((n, seq_len), np.int32)}
    for i, (ids, labels) in enumerate(rows):
        out["input_ids"][i, :len(ids)] = ids
        out["labels"][i, :len(ids)] = labels
        out["attention_mask"][i, :len(ids)] = 1
    return out


def batch_at(rows: dict[str, np.ndarray], step: int, batch: int, accum: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """The rows of training step `step` (0-based), [accum, batch, T] each: epochs of a seeded permutation of the
    rows, read in order, `batch * accum` rows per step. A function of the step alone, so a resumed run gets the
    same batches as an uninterrupted one."""
    n = len(rows["input_ids"])
    if n == 0:
        raise ValueError("no training rows")
    per_step = batch * accum
    start = step * per_step
    idx = []
    epoch, offset = divmod(start, n)
    while len(idx) < per_step:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx.extend(order[offset:offset + per_step - len(idx)].tolist())
        epoch, offset = epoch + 1, 0
    idx_arr = np.asarray(idx)
    return {k: v[idx_arr].reshape(accum, batch, -1) for k, v in rows.items()}
