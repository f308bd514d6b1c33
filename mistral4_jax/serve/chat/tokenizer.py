"""`Tokenizer`: text <-> token ids, special ids, the reasoning split, and the chat entry points.

`Tokenizer.from_dir(path)` picks a backend:

* ``tekken.json`` -> **tekken**: mistral-common's ``MistralTokenizer`` does everything; chat requests
  (`encode_chat`, `encode_chat_with_images`) are encoded by it (`format.py`), ids exactly its own.
* else ``tokenizer.json`` -> **tokenizers** (HF `tokenizers`): text encode/decode only, with bos/eos/pad
  from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present. mistral-common reads only
  tekken.json (or SentencePiece) files, and a tokenizer.json does not record what chat encoding needs
  (tokenizer version, model-settings builder), so chat encoding raises ValueError asking for tekken.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tokenizers import Tokenizer as HFTokenizer

from . import images
from .format import (BEGIN_THINK, END_THINK, build_request, check_messages, encode_request, has_image_parts,
                     split_reasoning, split_think, think_span)
from .stream import IncrementalDecoder

log = logging.getLogger(__name__)


def _token_content(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json/special_tokens_map.json: str or {"content": str}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Text <-> token ids and the chat format, over mistral-common (Tekken) or HF `tokenizers`.

    Build with `Tokenizer.from_dir`. ``backend`` is "tekken" or "tokenizers"; ``mistral`` is the
    mistral-common ``MistralTokenizer`` (None for "tokenizers").
    """

    def __init__(self, *, path: Path, mistral: MistralTokenizer | None = None, hf: HFTokenizer | None = None,
                 bos: str | None = None, eos: str | None = None, pad: str | None = None) -> None:
        if (mistral is None) == (hf is None):
            raise ValueError("give exactly one of mistral (a MistralTokenizer) or hf (a tokenizers.Tokenizer)")
        self.path = path
        self.mistral = mistral
        self._hf = hf
        if mistral is not None:
            self.backend = "tekken"
            self._tekken: Any = mistral.instruct_tokenizer.tokenizer
            tekk = self._tekken
            self._bos_id, self._eos_id, self._pad_id = int(tekk.bos_id), int(tekk.eos_id), int(tekk.pad_id)
            self._vocab_size = int(tekk.n_words)
            self._special_ids = frozenset(int(i) for i in tekk.special_ids)
        else:
            self.backend = "tokenizers"
            self._tekken = None
            self._vocab_size = int(hf.get_vocab_size(with_added_tokens=True))  # type: ignore[union-attr]
            self._bos_id = self._require_id(bos or "<s>", "bos")
            self._eos_id = self._require_id(eos or "</s>", "eos")
            pad_id = hf.token_to_id(pad or "<pad>")  # type: ignore[union-attr]
            self._pad_id = int(pad_id) if pad_id is not None else self._eos_id
            self._special_ids = frozenset(int(i) for i, t in hf.get_added_tokens_decoder().items()  # type: ignore[union-attr]
                                          if t.special)
        think = (self.token_id(BEGIN_THINK), self.token_id(END_THINK))
        self.think_ids: tuple[int, int] | None = think if None not in think else None  # type: ignore[assignment]
        self.reasoning_efforts: tuple[str, ...] = self._supported_efforts()

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike, backend: str = "auto") -> "Tokenizer":
        """Load from a checkpoint/tokenizer directory (or a ``tekken.json``/``tokenizer.json`` file).

        backend: "auto" (tekken.json if present, else tokenizer.json), "tekken" or "tokenizers" to force one.
        """
        if backend not in ("auto", "tekken", "tokenizers"):
            raise ValueError(f"backend must be 'auto', 'tekken' or 'tokenizers', got {backend!r}")
        p = Path(path)
        if p.is_file():
            directory = p.parent
            tekken = p if p.suffix == ".json" and "tekken" in p.name else None
            tok_json = p if tekken is None else None
        elif p.is_dir():
            directory = p
            tekken = p / "tekken.json" if (p / "tekken.json").is_file() else None
            tok_json = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None
        else:
            raise FileNotFoundError(f"no tokenizer at {p}: not a file or directory")
        if tekken is not None and backend in ("auto", "tekken"):
            mistral = MistralTokenizer.from_file(str(tekken), mode=ValidationMode.test)
            log.info("loaded %s through mistral-common (tokenizer %s)", tekken, mistral.instruct_tokenizer.tokenizer.version)
            return cls(path=tekken, mistral=mistral)
        if backend == "tekken":
            raise FileNotFoundError(f"no tekken.json in {directory}")
        if tok_json is None:
            raise FileNotFoundError(f"no tekken.json or tokenizer.json in {directory}")
        cfg: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
            f = directory / name
            if f.is_file():
                with open(f, encoding="utf-8") as fh:
                    cfg.update({k: v for k, v in json.load(fh).items() if v is not None})
        log.info("loaded %s through tokenizers (text only: chat encoding needs tekken.json)", tok_json)
        return cls(path=tok_json, hf=HFTokenizer.from_file(str(tok_json)), bos=_token_content(cfg.get("bos_token")),
                   eos=_token_content(cfg.get("eos_token")), pad=_token_content(cfg.get("pad_token")))

    def _require_id(self, token: str, what: str) -> int:
        i = self._hf.token_to_id(token)  # type: ignore[union-attr]
        if i is None:
            raise ValueError(f"{what} token {token!r} is not in the vocabulary of {self.path}")
        return int(i)

    # -- basic properties -----------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (the default stop token)."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (the eos id if the vocabulary has no pad token)."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (131072 for this model)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special (control) tokens."""
        return self._special_ids

    def token_id(self, token: str) -> int | None:
        """Id of a special token string such as ``"[THINK]"``, or None if the vocabulary lacks it."""
        if self._tekken is not None:
            try:
                return int(self._tekken.get_special_token(token))
            except Exception:  # noqa: BLE001 - mistral-common raises various types for unknown tokens
                return None
        i = self._hf.token_to_id(token)  # type: ignore[union-attr]
        return int(i) if i is not None and int(i) in self._special_ids else None

    def __repr__(self) -> str:
        return (f"Tokenizer(backend={self.backend!r}, path={str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"reasoning_efforts={self.reasoning_efforts})")

    # -- text -----------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text -> ids (no eos). Special-token strings inside ``text`` are encoded as ordinary text
        (as mistral-common does), never as control tokens."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if self._tekken is not None:
            return [int(i) for i in self._tekken.encode(text, bos=bos, eos=False)]
        hf = self._hf
        hf.encode_special_tokens = True  # type: ignore[union-attr]
        try:
            ids = hf.encode(text, add_special_tokens=False).ids  # type: ignore[union-attr]
        finally:
            hf.encode_special_tokens = False  # type: ignore[union-attr]
        return ([self._bos_id] if bos else []) + list(ids)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self._vocab_size}): {bad[:8]}")
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. ``skip_special`` drops control tokens; False writes them out (``[THINK]``, ...)."""
        ids = self._check_ids(ids)
        if self._tekken is not None:
            policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
            return self._tekken.decode(ids, special_token_policy=policy)
        return self._hf.decode(ids, skip_special_tokens=skip_special)  # type: ignore[union-attr]

    def incremental_decoder(self, skip_special: bool = True) -> IncrementalDecoder:
        """A streaming decoder over this tokenizer (see `IncrementalDecoder`)."""
        return IncrementalDecoder(self, skip_special=skip_special)

    def split_reasoning_ids(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(reasoning ids, the other ids) of generated ids, by the rules of `format.split_reasoning`
        applied to the ``[THINK]``/``[/THINK]`` ids (both without the tags); no think tokens: ([], ids)."""
        ids = self._check_ids(ids)
        if self.think_ids is None:
            return [], ids
        return split_think(ids, *think_span(ids, *self.think_ids))

    def split_reasoning(self, output: str | Sequence[int]) -> tuple[str, str]:
        """``(reasoning, content)`` of generated ids (each decoded with special tokens skipped), or of text
        decoded with special tokens kept (`format.split_reasoning`)."""
        if isinstance(output, str):
            return split_reasoning(output)
        reasoning, content = self.split_reasoning_ids(output)
        return self.decode(reasoning), self.decode(content)

    # -- chat -----------------------------------------------------------------------------------------

    def _supported_efforts(self) -> tuple[str, ...]:
        """reasoning_effort values this tokenizer can encode ("none" only without a model-settings builder)."""
        builder = getattr(self._tekken, "model_settings_builder", None)
        effort = getattr(builder, "reasoning_effort", None)
        if effort is None:
            return ("none",)
        return tuple(str(getattr(v, "value", v)) for v in effort.values)

    def _effort(self, reasoning_effort: str | None) -> str | None:
        """Validated reasoning_effort; None for "use the default" (also for "none" without model settings)."""
        if reasoning_effort is None:
            return None
        if not isinstance(reasoning_effort, str) or reasoning_effort not in self.reasoning_efforts:
            known = ", ".join(repr(e) for e in self.reasoning_efforts)
            raise ValueError(f"unknown reasoning_effort {reasoning_effort!r}: this tokenizer supports {known} "
                             "(or None for the default)")
        if self.reasoning_efforts == ("none",):
            return None  # nothing to encode: the vocabulary has no model settings, "none" is the only mode
        return reasoning_effort

    def reasons(self, reasoning_effort: str | None) -> bool:
        """Whether an answer under this reasoning_effort (None: the tokenizer's default) may open with a
        ``[THINK]`` block: the effort is not "none" and the vocabulary has the think tokens."""
        effort = self._effort(reasoning_effort)
        if effort is None:
            builder = getattr(getattr(self._tekken, "model_settings_builder", None), "reasoning_effort", None)
            effort = str(getattr(builder.default, "value", builder.default)) if builder is not None else "none"
        return effort != "none" and self.token_id(BEGIN_THINK) is not None

    def _mistral(self) -> MistralTokenizer:
        if self.mistral is None:
            raise ValueError(f"chat encoding needs a tekken.json (mistral-common's tokenizer file); {self.path} is a "
                             "tokenizer.json, which encodes and decodes text only")
        return self.mistral

    def encode_chat(self, messages: list[dict[str, Any]], reasoning_effort: str | None = None,
                    continue_final_message: bool = False, tools: Any = None, tool_choice: Any = "auto") -> list[int]:
        """OpenAI-style chat messages -> prompt ids, exactly mistral-common's ``encode_chat_completion``.

        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str | [{"type": "text", ...}],
        ...}]``; assistant messages may carry ``"reasoning"``/``"reasoning_content"`` or ``{"type":
        "thinking", ...}`` parts (a ``[THINK]`` block) and ``"tool_calls"`` (``[{"id", "type": "function",
        "function": {"name", "arguments": JSON string}}]``); tool messages carry ``"tool_call_id"``. Image
        parts raise ValueError (use `encode_chat_with_images`). reasoning_effort: None (the tokenizer's
        default, "none" for this model), "none" or "high". continue_final_message: the last message is an
        assistant prefix to continue (no ``</s>`` after it). tools / tool_choice: see `tools.py` (the
        choice does not change the ids; it is checked here). ValueError for every bad request.
        """
        check_messages(messages)
        mistral = self._mistral()
        request = build_request(messages, self._effort(reasoning_effort), continue_final_message, tools, tool_choice)
        return encode_request(mistral, request)

    def image_processor(self, fallback: Any = None) -> Any:
        """The `image.ImageProcessor` whose token layout this tokenizer's chat encoding uses (see
        `images.tokenizer_image_processor`)."""
        return images.tokenizer_image_processor(self, fallback)

    def encode_chat_with_images(self, messages: list[dict[str, Any]], reasoning_effort: str | None = None,
                                continue_final_message: bool = False, image_processor: Any = None, tools: Any = None,
                                tool_choice: Any = "auto") -> tuple[list[int], list[Any]]:
        """`encode_chat` for messages with image parts: (prompt ids, `image.ProcessedImage` per image in
        prompt order); see `images.encode_with_images` (image_processor: the model's, for sizes a
        tekken.json without an image section lacks)."""
        check_messages(messages, allow_images=True)
        if not has_image_parts(messages):
            return self.encode_chat(messages, reasoning_effort, continue_final_message, tools, tool_choice), []
        mistral = self._mistral()
        return images.encode_with_images(self, mistral, messages, self._effort(reasoning_effort), continue_final_message,
                                         tools, tool_choice, image_processor)
