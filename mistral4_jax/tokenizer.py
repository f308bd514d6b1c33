"""Tokenizer and chat format for Mistral Small 4.

`Tokenizer.from_dir(path)` picks a backend:

* ``tekken.json`` + mistral-common installed -> the **Tekken** backend. Chat requests are encoded by
  mistral-common itself (``ChatCompletionRequest.from_openai`` + ``MistralTokenizer.
  encode_chat_completion``), so the token ids are exactly mistral-common's.
* else ``tokenizer.json`` -> the **tokenizers** backend (HF `tokenizers`, no mistral-common needed).
  bos/eos/pad come from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present. Chat
  requests are rendered with the Jinja chat template (``chat_template.jinja``, else
  ``tokenizer_config.json["chat_template"]``), or, without one, with `_manual_chat_layout`, a
  hand-written copy of mistral-common's v13/v15 text layout (see there).

Chat format of this model (mistral-common tokenizer version v15)::

    <s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS]
    [INST]user[/INST][THINK]reasoning[/THINK]answer</s>[INST]next user[/INST]

(one line in reality). ``reasoning_effort`` is "none" (default, mistral-common's builder default) or
"high"; the model emits its reasoning between ``[THINK]`` and ``[/THINK]`` (`split_reasoning`).

mistral-common >= 1.11 expresses this as tokenizer version ``v15`` with a ``model_settings_builder``
section in ``tekken.json`` (``{"reasoning_effort": {"values": ["none", "high"], "default": "none"}}``)
and the special tokens ``[THINK]``, ``[/THINK]``, ``[MODEL_SETTINGS]``, ``[/MODEL_SETTINGS]``; the
request field is ``ChatCompletionRequest.reasoning_effort``. The Tekken files bundled with
mistral-common (``tekken_240718.json``, ``tekken_240911.json``: v3, 131072 vocab, no
``special_tokens`` section) have none of these specials. `write_synthetic_tekken` builds, offline, a
v15 ``tekken.json`` from the bundled ``tekken_240911.json`` vocabulary with those specials and the
builder added, which mistral-common then loads and encodes like the real file (used by the tests and
handy for demos; the special-token ranks it uses are an assumption, the checkpoint's own
``tekken.json`` is authoritative).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

__all__ = [
    "BEGIN_THINK",
    "END_THINK",
    "IncrementalDecoder",
    "REASONING_EFFORTS",
    "Tokenizer",
    "has_image_parts",
    "split_reasoning",
    "write_synthetic_tekken",
]

BEGIN_THINK = "[THINK]"
END_THINK = "[/THINK]"
BEGIN_MODEL_SETTINGS = "[MODEL_SETTINGS]"
END_MODEL_SETTINGS = "[/MODEL_SETTINGS]"
REASONING_EFFORTS = ("none", "high")
"""reasoning_effort values this model accepts (mistral-common's builder for Mistral Small 4)."""

_IMAGE_PART_TYPES = {"image", "image_url", "input_image", "image_base64", "image_file"}
_TEXT_PART_TYPES = {"text"}
_MSG_JOIN = "\n\n"  # mistral-common: text of consecutive same-role messages
_CHUNK_JOIN = ""    # mistral-common v15: adjacent text chunks inside one message

# Special-token layout of `write_synthetic_tekken` (ranks 0-19 are mistral-common's
# DEPRECATED_SPECIAL_TOKENS; 32-35 as in Mistral's recent v13 files; 36/37 assumed).
_SYNTHETIC_EXTRA_SPECIALS = {
    32: "[ARGS]",
    33: "[CALL_ID]",
    34: BEGIN_THINK,
    35: END_THINK,
    36: BEGIN_MODEL_SETTINGS,
    37: END_MODEL_SETTINGS,
}


def _have_mistral_common() -> bool:
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        return False
    return True


def _token_content(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json/special_tokens_map.json: str or {"content": str}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# ----------------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------------

def has_image_parts(messages: Any) -> bool:
    """Whether any message content holds an image part (`image_url`, `image`, ...)."""
    if not isinstance(messages, (list, tuple)):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), (list, tuple))
               and any(isinstance(p, dict) and p.get("type") in _IMAGE_PART_TYPES for p in m["content"])
               for m in messages)


def _image_source(part: dict[str, Any], where: str) -> Any:
    """The image source of an image part: `{"type": "image_url", "image_url": {"url": ...} | "..."}`,
    `{"type": "image", "image": PIL | bytes | path | array}` or `{"type": "input_image", "image_url": "..."}`."""
    kind = part["type"]
    if kind in ("image_url", "input_image"):
        value = part.get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: an {kind!r} part needs an image_url (a path, file:// URL or data URI)")
        return value
    if kind == "image":
        if part.get("image") is None:
            raise ValueError(f"{where}: an 'image' part needs an 'image' (a PIL image, bytes, a path or a data URI)")
        return part["image"]
    raise ValueError(f"{where}: unsupported image part type {kind!r} (use 'image_url' or 'image')")


def _check_messages(messages: Any, allow_images: bool = False) -> None:
    """Shape checks shared by both backends; image parts -> ValueError unless `allow_images`."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with a 'role', got {msg!r}")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError(f"messages[{i}].content[{j}] must be a dict with a 'type', got {part!r}")
            if part["type"] in _IMAGE_PART_TYPES and not allow_images:
                raise ValueError(
                    f"messages[{i}].content[{j}] is an image part ({part['type']!r}): encode_chat returns ids only; "
                    "use encode_chat_with_images (or Mistral4.chat) for messages with images")


def _text_of(content: Any, where: str) -> tuple[str, list[tuple[str, bool]]]:
    """(text, thinking chunks [(text, closed)]) of a message content (str or list of parts)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    thinks: list[tuple[str, bool]] = []
    for part in content:
        kind = part["type"]
        if kind in _TEXT_PART_TYPES:
            texts.append(str(part.get("text", "")))
        elif kind == "thinking":
            if texts:
                raise ValueError(f"{where}: thinking parts must come before text parts")
            thinks.append((str(part.get("thinking", "")), bool(part.get("closed", True))))
        else:
            raise ValueError(f"{where}: unsupported content part type {kind!r} (text parts only)")
    return _CHUNK_JOIN.join(texts), thinks


# ----------------------------------------------------------------------------------------------------
# reasoning split
# ----------------------------------------------------------------------------------------------------

def split_reasoning(output: str | Sequence[int], tokenizer: "Tokenizer | None" = None) -> tuple[str, str]:
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
    text = output
    b = text.find(BEGIN_THINK)
    e = text.find(END_THINK, b + len(BEGIN_THINK) if b >= 0 else 0)
    if b < 0 and e < 0:
        return "", text
    if b < 0:
        return text[:e], text[e + len(END_THINK):]
    if e < 0:
        return text[b + len(BEGIN_THINK):], text[:b]
    return text[b + len(BEGIN_THINK):e], text[:b] + text[e + len(END_THINK):]


# ----------------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids and the chat format, over mistral-common (Tekken) or HF `tokenizers`.

    Build with `Tokenizer.from_dir`. ``backend`` is "tekken" or "tokenizers".
    """

    def __init__(self, *, backend: str, path: Path, mistral: Any = None, hf: Any = None,
                 chat_template: str | None = None, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None) -> None:
        self.backend = backend
        self.path = path
        self._mistral = mistral            # mistral_common MistralTokenizer (tekken backend)
        self._hf = hf                      # tokenizers.Tokenizer (tokenizers backend)
        self.chat_template = chat_template
        self._template_fn: Any = None
        if backend == "tekken":
            tekk = mistral.instruct_tokenizer.tokenizer
            self._tekken = tekk
            self._bos_id, self._eos_id, self._pad_id = int(tekk.bos_id), int(tekk.eos_id), int(tekk.pad_id)
            self._vocab_size = int(tekk.n_words)
            self._special_ids = frozenset(int(i) for i in tekk.special_ids)
        elif backend == "tokenizers":
            self._tekken = None
            self._vocab_size = int(hf.get_vocab_size(with_added_tokens=True))
            self._bos_tok, self._eos_tok = bos or "<s>", eos or "</s>"
            self._bos_id = self._require_id(self._bos_tok, "bos")
            self._eos_id = self._require_id(self._eos_tok, "eos")
            pad_id = hf.token_to_id(pad or "<pad>")
            self._pad_id = int(pad_id) if pad_id is not None else self._eos_id
            self._special_ids = frozenset(int(i) for i, t in hf.get_added_tokens_decoder().items() if t.special)
        else:
            raise ValueError(f"unknown backend {backend!r}")
        think = (self.token_id(BEGIN_THINK), self.token_id(END_THINK))
        self.think_ids: tuple[int, int] | None = think if None not in think else None  # type: ignore[assignment]
        self.reasoning_efforts: tuple[str, ...] = self._supported_efforts()

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike, backend: str = "auto") -> "Tokenizer":
        """Load from a checkpoint/tokenizer directory (or a ``tekken.json``/``tokenizer.json`` file).

        backend: "auto" (tekken.json via mistral-common if both are available, else tokenizer.json),
        "tekken" or "tokenizers" to force one.
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

        use_tekken = tekken is not None and backend in ("auto", "tekken")
        if use_tekken and not _have_mistral_common():
            if backend == "tekken" or tok_json is None:
                raise ImportError(f"{tekken} needs mistral-common (pip install 'mistral-common>=1.11')"
                                  + ("" if tok_json is None else "; or use backend='tokenizers'"))
            log.warning("mistral-common is not installed: using %s instead of %s", tok_json, tekken)
            use_tekken = False
        if use_tekken:
            return cls._from_tekken(tekken)  # type: ignore[arg-type]
        if backend == "tekken":
            raise FileNotFoundError(f"no tekken.json in {directory}")
        if tok_json is None:
            raise FileNotFoundError(f"no tekken.json or tokenizer.json in {directory}")
        return cls._from_tokenizer_json(tok_json, directory)

    @classmethod
    def _from_tekken(cls, path: Path) -> "Tokenizer":
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        mt = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
        log.info("loaded %s through mistral-common (tokenizer %s)", path, mt.instruct_tokenizer.tokenizer.version)
        return cls(backend="tekken", path=path, mistral=mt)

    @classmethod
    def _from_tokenizer_json(cls, path: Path, directory: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(str(path))
        cfg: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
            f = directory / name
            if f.is_file():
                with open(f, encoding="utf-8") as fh:
                    data = json.load(fh)
                cfg.update({k: v for k, v in data.items() if v is not None})
        template = None
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in cfg["chat_template"] if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        log.info("loaded %s through tokenizers (chat template: %s)", path, "yes" if template else "manual layout")
        return cls(backend="tokenizers", path=path, hf=hf, chat_template=template,
                   bos=_token_content(cfg.get("bos_token")), eos=_token_content(cfg.get("eos_token")),
                   pad=_token_content(cfg.get("pad_token")))

    def _require_id(self, token: str, what: str) -> int:
        i = self._hf.token_to_id(token)
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
        i = self._hf.token_to_id(token)
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
        self._hf.encode_special_tokens = True
        try:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        finally:
            self._hf.encode_special_tokens = False
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
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
            return self._tekken.decode(ids, special_token_policy=policy)
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def incremental_decoder(self, skip_special: bool = True) -> "IncrementalDecoder":
        """A streaming decoder over this tokenizer (see `IncrementalDecoder`)."""
        return IncrementalDecoder(self, skip_special=skip_special)

    def split_reasoning(self, output: str | Sequence[int]) -> tuple[str, str]:
        """``(reasoning, content)`` of generated ids (or of text decoded with special tokens kept).

        On ids the split uses the ``[THINK]``/``[/THINK]`` token ids (same rules as the module-level
        `split_reasoning`), and each part is decoded with special tokens skipped. A vocabulary without
        think tokens gives ``("", decode(ids))``.
        """
        if isinstance(output, str):
            return split_reasoning(output)
        ids = self._check_ids(output)
        if self.think_ids is None:
            return "", self.decode(ids)
        begin, end = self.think_ids
        b = ids.index(begin) if begin in ids else -1
        e = -1
        for i in range(b + 1 if b >= 0 else 0, len(ids)):
            if ids[i] == end:
                e = i
                break
        if b < 0 and e < 0:
            return "", self.decode(ids)
        if b < 0:
            return self.decode(ids[:e]), self.decode(ids[e + 1:])
        if e < 0:
            return self.decode(ids[b + 1:]), self.decode(ids[:b])
        return self.decode(ids[b + 1:e]), self.decode(ids[:b] + ids[e + 1:])

    # -- chat -----------------------------------------------------------------------------------------

    def _supported_efforts(self) -> tuple[str, ...]:
        """reasoning_effort values this tokenizer can encode ("none" only if it has no model settings)."""
        if self._tekken is not None:
            builder = getattr(self._tekken, "model_settings_builder", None)
            effort = getattr(builder, "reasoning_effort", None) if builder is not None else None
            if effort is None:
                return ("none",)
            return tuple(str(getattr(v, "value", v)) for v in effort.values)
        if self.token_id(BEGIN_MODEL_SETTINGS) is not None and self.token_id(END_MODEL_SETTINGS) is not None:
            return REASONING_EFFORTS
        return ("none",)

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

    def encode_chat(self, messages: list[dict[str, Any]], reasoning_effort: str | None = None,
                    continue_final_message: bool = False) -> list[int]:
        """OpenAI-style chat messages -> prompt ids ending with ``[/INST]`` (ready for generation).

        messages: ``[{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...}],
        ...}]``; assistant messages may carry ``"reasoning"``/``"reasoning_content"`` (encoded as a
        ``[THINK]`` block) or ``{"type": "thinking", "thinking": ...}`` parts. Image parts raise
        ValueError (use `encode_chat_with_images`, which also returns the preprocessed images). reasoning_effort: None (tokenizer default, "none" for
        this model), "none" or "high"; anything else raises ValueError. continue_final_message: the last
        message is an assistant prefix to continue (no ``</s>`` after it).

        Tekken backend: exactly mistral-common's ``encode_chat_completion`` ids (its validation errors
        become ValueError). tokenizers backend: the chat template if there is one (rendered like
        transformers' ``apply_chat_template``, so special-token strings typed inside message text are
        parsed as control tokens there), else `_manual_chat_layout` (which, like mistral-common, encodes
        message text as plain text). The tests check both against mistral-common's ids.
        """
        _check_messages(messages)
        effort = self._effort(reasoning_effort)
        if self._mistral is not None:
            return self._encode_chat_mistral(messages, effort, continue_final_message)
        if self.chat_template is not None:
            return self._encode_chat_template(messages, effort, continue_final_message)
        return self._manual_chat_layout(messages, effort, continue_final_message)

    # -- images ---------------------------------------------------------------------------------------

    def image_processor(self, fallback: Any = None) -> Any:
        """The `image.ImageProcessor` whose token layout this tokenizer's chat encoding uses.

        Tekken backend only. Sizes from tekken.json's ``image`` section (``image_patch_size``,
        ``spatial_merge_size``, ``max_image_size``) when it has one, else from `fallback` (the model's
        processor); always ``rounding="round"`` (mistral-common's token counts for downscaled images) and
        the vocabulary's ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` ids. ValueError if images cannot be encoded.
        """
        import dataclasses

        from .image import ImageProcessor

        if self._mistral is None:
            raise ValueError(f"image inputs need a Tekken tokenizer (tekken.json + mistral-common); {self.path} is "
                             "loaded through tokenizers, whose chat encoding is text only")
        ids = [self.token_id(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
        if None in ids:
            raise ValueError(f"the vocabulary of {self.path} has no [IMG]/[IMG_BREAK]/[IMG_END] tokens: it cannot encode images")
        token_ids = dict(image_token_id=ids[0], image_break_token_id=ids[1], image_end_token_id=ids[2])
        cfg = getattr(self._tekken, "image", None)
        if cfg is not None:
            return ImageProcessor(patch_size=int(cfg.image_patch_size), spatial_merge_size=int(cfg.spatial_merge_size),
                                  longest_edge=int(cfg.max_image_size), rounding="round", **token_ids)
        if fallback is None:
            raise ValueError(f"{self.path} has no image config (an 'image' section in tekken.json) and no model "
                             "image processor was given: this tokenizer cannot encode images")
        return dataclasses.replace(fallback, rounding="round", **token_ids)

    def encode_chat_with_images(self, messages: list[dict[str, Any]], reasoning_effort: str | None = None,
                                continue_final_message: bool = False,
                                image_processor: Any = None) -> tuple[list[int], list[Any]]:
        """`encode_chat` for messages with image parts: (prompt ids, `image.ProcessedImage` per image in
        prompt order).

        Image parts: ``{"type": "image_url", "image_url": {"url": path | "file://..." | data URI}}`` (or the
        URL as a plain string), ``{"type": "image", "image": PIL image | bytes | path | uint8 array}``;
        http(s) URLs are refused (nothing is downloaded). The ids are mistral-common's
        (``ChatCompletionRequest`` with image chunks, ``encode_chat_completion``): the image chunks are
        encoded by our `image.ImageProcessor` (`image_processor()`: mistral-common's token grid, PIL
        bicubic pixels as transformers' processor, no OpenCV) in place of mistral-common's encoder, so the
        `[IMG]` count of each image equals its number of features. Every image is decoded before encoding;
        a corrupt, truncated, zero-sized or missing image raises ValueError naming it
        (``messages[i].content[j]``). Tekken backend only.
        """
        _check_messages(messages, allow_images=True)
        effort = self._effort(reasoning_effort)
        if not has_image_parts(messages):
            return self.encode_chat(messages, reasoning_effort, continue_final_message), []
        proc = self.image_processor(image_processor)
        from .image import describe

        converted: list[dict[str, Any]] = []
        processed: dict[str, Any] = {}
        for i, msg in enumerate(messages):
            content = msg.get("content")
            if not isinstance(content, (list, tuple)):
                converted.append(dict(msg))
                continue
            parts = []
            for j, part in enumerate(content):
                if part["type"] not in _IMAGE_PART_TYPES:
                    parts.append(part)
                    continue
                where = f"messages[{i}].content[{j}]"
                src = _image_source(part, where)
                key = f"mistral4-jax-image:{len(processed)}"
                processed[key] = proc.preprocess(src, f"{where} ({describe(src)})")
                parts.append({"type": "image_url", "image_url": {"url": key}})
            converted.append({**msg, "content": parts})
        encoder = _ImageEncoder(proc, processed)
        instruct = self._mistral.instruct_tokenizer
        previous = getattr(instruct, "image_encoder", None)
        instruct.image_encoder = encoder
        try:
            ids = self._encode_chat_mistral(converted, effort, continue_final_message)
        finally:
            instruct.image_encoder = previous
        if sorted(encoder.used) != sorted(processed) or len(encoder.used) != len(processed):
            raise ValueError(f"mistral-common encoded {len(encoder.used)} image chunks for {len(processed)} image parts")
        images = [processed[k] for k in encoder.used]
        n_img = sum(1 for t in ids if t == proc.image_token_id)
        if n_img != sum(p.num_features for p in images):
            raise ValueError(f"the prompt has {n_img} [IMG] tokens but its images give {sum(p.num_features for p in images)} features")
        return ids, images

    def _encode_chat_mistral(self, messages: list[dict[str, Any]], effort: str | None,
                             continue_final_message: bool) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        kwargs: dict[str, Any] = {}
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        try:
            request = ChatCompletionRequest.from_openai(
                [dict(m) for m in messages], continue_final_message=continue_final_message, **kwargs)
            return [int(i) for i in self._mistral.encode_chat_completion(request).tokens]
        except (MistralCommonException, ValidationError, AssertionError, TypeError, KeyError) as e:
            raise ValueError(f"invalid chat request: {type(e).__name__}: {e}") from e

    def _encode_chat_template(self, messages: list[dict[str, Any]], effort: str | None,
                              continue_final_message: bool) -> list[int]:
        if self._template_fn is None:
            try:
                self._template_fn = _compile_template(self.chat_template)  # type: ignore[arg-type]
            except ImportError:
                log.warning("jinja2 is not installed: ignoring the chat template, using the manual layout")
                self.chat_template = None
                return self._manual_chat_layout(messages, effort, continue_final_message)
        last = messages[-1].get("role")
        if continue_final_message and last != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        if not continue_final_message and last == "assistant":  # as mistral-common's validator
            raise ValueError("the last message must be a user (or tool) message; pass continue_final_message=True "
                             "to continue an assistant prefix")
        kwargs: dict[str, Any] = dict(messages=[dict(m) for m in messages], bos_token=self._bos_tok,
                                      eos_token=self._eos_tok, add_generation_prompt=not continue_final_message)
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        try:
            text = self._template_fn(**kwargs)
        except _TemplateError as e:
            raise ValueError(f"invalid chat request: {e}") from e
        if continue_final_message and text.endswith(self._eos_tok):
            text = text[: -len(self._eos_tok)]
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def _special(self, token: str) -> int:
        i = self.token_id(token)
        if i is None:
            raise ValueError(f"the vocabulary of {self.path} has no {token} token")
        return i

    def _manual_chat_layout(self, messages: list[dict[str, Any]], effort: str | None,
                            continue_final_message: bool) -> list[int]:
        """Mistral's v13/v15 text chat layout, written out (tokenizers backend without a chat template).

        ``<s>``, then per message in order: system -> ``[SYSTEM_PROMPT]text[/SYSTEM_PROMPT]``; before the
        first user message, if the vocabulary has ``[MODEL_SETTINGS]``: ``[MODEL_SETTINGS]{"reasoning_effort":
        "none"|"high"}[/MODEL_SETTINGS]``; user -> ``[INST]text[/INST]``; assistant -> ``[THINK]reasoning
        [/THINK]`` (when it has reasoning), then ``text</s>`` (no ``</s>`` after a final message with
        continue_final_message). Consecutive user (or assistant) messages are merged, their texts joined
        with "\\n\\n"; text parts of one message are joined with "". Texts are encoded as plain text.
        Not covered (ValueError): tool messages / tool calls.
        """
        roles = [m["role"] for m in messages]
        for r in roles:
            if r not in ("system", "user", "assistant"):
                raise ValueError(f"unsupported role {r!r}: only system, user and assistant messages are supported")
        if continue_final_message:
            if roles[-1] != "assistant":
                raise ValueError("continue_final_message needs an assistant message last")
        elif roles[-1] != "user":
            raise ValueError(f"the last message must be a user message (got {roles[-1]!r}); "
                             "pass continue_final_message=True to continue an assistant prefix")

        # merge consecutive user / assistant messages
        groups: list[tuple[str, list[dict[str, Any]]]] = []
        for m in messages:
            if m.get("tool_calls"):
                raise ValueError("tool calls are not supported")
            if groups and groups[-1][0] == m["role"] and m["role"] != "system":
                groups[-1][1].append(m)
            else:
                groups.append((m["role"], [m]))

        ids = [self._bos_id]
        settings_done = False
        for gi, (role, group) in enumerate(groups):
            texts: list[str] = []
            thinks: list[tuple[str, bool]] = []
            for m in group:
                text, th = _text_of(m.get("content"), f"{role} message")
                reasoning = m.get("reasoning_content", m.get("reasoning"))
                if reasoning:
                    if th:
                        raise ValueError("a message cannot have both thinking parts and a reasoning field")
                    th = [(str(reasoning), True)]
                thinks.extend(th)
                if text:
                    texts.append(text)
            text = _MSG_JOIN.join(texts)
            if role == "system":
                if thinks:
                    raise ValueError("thinking parts are not supported in system messages")
                ids += [self._special("[SYSTEM_PROMPT]"), *self.encode(text), self._special("[/SYSTEM_PROMPT]")]
            elif role == "user":
                if thinks:
                    raise ValueError("thinking parts are not supported in user messages")
                if not text:
                    raise ValueError("user messages must have non-empty content")
                if not settings_done and self.reasoning_efforts != ("none",):
                    settings = json.dumps({"reasoning_effort": effort or "none"}, ensure_ascii=False)
                    ids += [self._special(BEGIN_MODEL_SETTINGS), *self.encode(settings),
                            self._special(END_MODEL_SETTINGS)]
                settings_done = True
                ids += [self._special("[INST]"), *self.encode(text), self._special("[/INST]")]
            else:
                for think, closed in thinks:
                    begin, end = self._special(BEGIN_THINK), self._special(END_THINK)
                    ids += [begin, *self.encode(think)] + ([end] if closed else [])
                ids += self.encode(text)
                if not (continue_final_message and gi == len(groups) - 1):
                    ids.append(self._eos_id)
        return ids


class _ImageEncoder:
    """Stands in for mistral-common's `ImageEncoder` during one `encode_chat_with_images` call: the
    placeholder URL of each image chunk -> the already preprocessed image's placeholder ids and pixels."""

    def __init__(self, proc: Any, processed: dict[str, Any]) -> None:
        from mistral_common.tokens.tokenizers.image import ImageConfig, SpecialImageIDs

        self.processed = processed
        self.used: list[str] = []
        self.image_config = ImageConfig(proc.patch_size, proc.longest_edge, proc.spatial_merge_size)
        self.special_ids = SpecialImageIDs(proc.image_token_id, proc.image_break_token_id, proc.image_end_token_id)

    @property
    def mm_config(self) -> Any:
        return self.image_config

    @property
    def image_token(self) -> int:
        return self.special_ids.img

    def __call__(self, chunk: Any) -> Any:
        from mistral_common.tokens.tokenizers.image import ImageEncoding

        url = chunk.get_url() if hasattr(chunk, "get_url") else None
        if url not in self.processed:
            raise ValueError(f"unexpected image chunk {type(chunk).__name__} (images must come as message parts)")
        self.used.append(url)
        p = self.processed[url]
        return ImageEncoding(tokens=list(p.token_ids), image=p.pixel_values)


# ----------------------------------------------------------------------------------------------------
# chat templates (tokenizers backend)
# ----------------------------------------------------------------------------------------------------

class _TemplateError(Exception):
    """Raised by a chat template's raise_exception()."""


def _compile_template(source: str) -> Any:
    """A render function for a HF-style chat template (same Jinja environment as transformers)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with most installs
        raise ImportError("applying a chat template needs jinja2 (pip install jinja2)") from e

    def raise_exception(message: str) -> None:
        raise _TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(source)
    return template.render


# ----------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Streaming detokenizer: feed ids as they are generated, get the newly completed text.

    Never emits half a character: byte-level tokens that end inside a multi-byte UTF-8 sequence are
    held back until the character completes (the decoded window then no longer ends in U+FFFD). Each
    step decodes only a short window (from the start of the last emitted piece), so the cost per
    token does not grow with the output, and the concatenation of all returned pieces plus `flush()`
    equals ``tokenizer.decode(all_ids, skip_special)``. The ids fed so far are in ``.ids``.

        dec = tokenizer.incremental_decoder()
        for tok in stream: print(dec.feed(tok), end="", flush=True)
        print(dec.flush())
    """

    MAX_SEARCH = 16  # how many trailing token boundaries to try when the window ends mid-character

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0   # start of the decode window (a character boundary)
        self._read = 0     # ids before this are emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _emit(self, force: bool) -> str:
        n = len(self.ids)
        if self._read >= n:
            return ""

        def dec(a: int, b: int) -> str:
            return self.tokenizer.decode(self.ids[a:b], skip_special=self.skip_special)

        end, new_text = n, dec(self._prefix, n)
        if not force and new_text.endswith("\ufffd"):
            # Emit up to the last token boundary that closes a character; hold the rest back. (A
            # byte-level BPE token may span character boundaries, so several tokens can be pending.)
            # An invalid byte inside the text is emitted as U+FFFD once later text completes it.
            for cut in range(n - 1, max(self._read, n - self.MAX_SEARCH), -1):
                text = dec(self._prefix, cut)
                if not text.endswith("\ufffd"):
                    end, new_text = cut, text
                    break
            else:
                return ""  # wait for the character to complete (or for flush())
        prefix_text = dec(self._prefix, self._read)
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:  # should not happen with byte-level BPE; stay consistent with a full decode
            delta = dec(0, end)[len(self.text):]
        self._prefix, self._read = self._read, end
        self._pieces.append(delta)
        return delta

    def feed(self, ids: int | Iterable[int]) -> str:
        """Append one id or several; return the text they completed ("" while a character is incomplete)."""
        try:
            self.ids.extend(int(i) for i in ids)  # type: ignore[union-attr]
        except TypeError:  # a single id
            self.ids.append(int(ids))  # type: ignore[arg-type]
        return self._emit(force=False)

    def flush(self) -> str:
        """Emit whatever is still held back (end of generation)."""
        return self._emit(force=True)


# ----------------------------------------------------------------------------------------------------
# an offline v15 Tekken file for tests and demos
# ----------------------------------------------------------------------------------------------------

def write_synthetic_tekken(out: str | os.PathLike, *, base: str = "tekken_240911.json",
                           reasoning_efforts: Sequence[str] = REASONING_EFFORTS,
                           default_effort: str = "none", image: dict[str, int] | None = None) -> Path:
    """Write a v15 ``tekken.json`` with ``[THINK]``/``[MODEL_SETTINGS]`` specials, offline.

    Takes the real 131072-token Tekken vocabulary bundled with mistral-common (``base``, in
    ``mistral_common/data``), declares special tokens explicitly (mistral-common's 20 legacy specials at
    ranks 0-19, ``<SPECIAL_i>`` fillers, ``[ARGS]`` 32, ``[CALL_ID]`` 33, ``[THINK]`` 34, ``[/THINK]`` 35,
    ``[MODEL_SETTINGS]`` 36, ``[/MODEL_SETTINGS]`` 37 - the last two ranks are an assumption), sets
    ``config.version = "v15"`` and adds ``model_settings_builder = {"reasoning_effort": {"values":
    [...], "default": "none"}}``; drops the base file's image section, and writes ``image`` instead when
    given (mistral-common's ``ImageConfig`` fields: ``{"image_patch_size": 14, "max_image_size": 1540,
    "spatial_merge_size": 2}`` for Mistral Small 3.1 / 4; ``[IMG]`` 10, ``[IMG_BREAK]`` 12, ``[IMG_END]`` 13
    are among the legacy specials). mistral-common loads the result
    as an ``InstructTokenizerV15``, so its chat encoding (model settings, think blocks) is the real
    one; only the special-token ranks may differ from the released checkpoint's file.

    out: a directory (writes ``out/tekken.json``) or a file path. Returns the written path.
    """
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    src = Path(mistral_common.__file__).parent / "data" / base
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    specials = [{"rank": int(t["rank"]), "token_str": str(getattr(t["token_str"], "value", t["token_str"])),
                 "is_control": bool(t["is_control"])} for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    top = max(_SYNTHETIC_EXTRA_SPECIALS) + 1
    for rank in range(len(specials), top):
        token = _SYNTHETIC_EXTRA_SPECIALS.get(rank, Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=rank))
        specials.append({"rank": rank, "token_str": token, "is_control": True})
    data["special_tokens"] = specials
    data["config"]["version"] = "v15"
    data.pop("image", None)
    data.pop("multimodal", None)
    if image is not None:
        data["image"] = {k: int(image[k]) for k in ("image_patch_size", "max_image_size", "spatial_merge_size")}
    data["model_settings_builder"] = {
        "reasoning_effort": {"values": list(reasoning_efforts), "default": default_effort}}
    path = Path(out)
    if path.is_dir() or path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tekken.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    log.info("wrote synthetic v15 tekken file %s (from %s)", path, src.name)
    return path
