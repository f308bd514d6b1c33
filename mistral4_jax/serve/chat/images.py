"""Chat messages with image parts -> mistral-common's prompt ids plus our preprocessed images.

Image parts: ``{"type": "image_url", "image_url": {"url": path | "file://..." | data URI}}`` (or the URL
as a plain string), ``{"type": "image", "image": PIL image | bytes | path | uint8 array}``; http(s) URLs
are refused (nothing is downloaded). Every image is decoded and preprocessed by our `image.ImageProcessor`
first (a corrupt, truncated, zero-sized or missing image raises ValueError naming ``messages[i].content[j]``);
mistral-common then encodes the request with a stand-in for its image encoder that returns those images'
placeholder ids, so the ids are mistral-common's and the ``[IMG]`` count of each image equals its number
of features (mistral-common's token grid, PIL bicubic pixels as transformers' processor, no OpenCV).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoding, SpecialImageIDs
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from ..image import ImageProcessor, describe
from .format import IMAGE_PART_TYPES, build_request, encode_request


def tokenizer_image_processor(tokenizer: Any, fallback: ImageProcessor | None = None) -> ImageProcessor:
    """The `ImageProcessor` whose token layout a Tekken `Tokenizer`'s chat encoding uses.

    Sizes from tekken.json's ``image`` section (``image_patch_size``, ``spatial_merge_size``,
    ``max_image_size``) when it has one, else from `fallback` (the model's processor); always
    ``rounding="round"`` (mistral-common's token counts for downscaled images) and the vocabulary's
    ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` ids. ValueError if this tokenizer cannot encode images.
    """
    if tokenizer.mistral is None:
        raise ValueError(f"image inputs need a Tekken tokenizer (tekken.json); {tokenizer.path} is a tokenizer.json, "
                         "which encodes and decodes text only")
    ids = [tokenizer.token_id(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")]
    if None in ids:
        raise ValueError(f"the vocabulary of {tokenizer.path} has no [IMG]/[IMG_BREAK]/[IMG_END] tokens: it cannot "
                         "encode images")
    token_ids = dict(image_token_id=ids[0], image_break_token_id=ids[1], image_end_token_id=ids[2])
    cfg = getattr(tokenizer.mistral.instruct_tokenizer.tokenizer, "image", None)
    if cfg is not None:
        return ImageProcessor(patch_size=int(cfg.image_patch_size), spatial_merge_size=int(cfg.spatial_merge_size),
                              longest_edge=int(cfg.max_image_size), rounding="round", **token_ids)
    if fallback is None:
        raise ValueError(f"{tokenizer.path} has no image config (an 'image' section in tekken.json) and no model "
                         "image processor was given: this tokenizer cannot encode images")
    return dataclasses.replace(fallback, rounding="round", **token_ids)


def image_source(part: dict[str, Any], where: str) -> Any:
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


class _ImageEncoder:
    """Stands in for mistral-common's `ImageEncoder` during one `encode_with_images` call: the
    placeholder URL of each image chunk -> the already preprocessed image's placeholder ids and pixels."""

    def __init__(self, proc: ImageProcessor, processed: dict[str, Any]) -> None:
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

    def __call__(self, chunk: Any) -> ImageEncoding:
        url = chunk.get_url() if hasattr(chunk, "get_url") else None
        if url not in self.processed:
            raise ValueError(f"unexpected image chunk {type(chunk).__name__} (images must come as message parts)")
        self.used.append(url)
        p = self.processed[url]
        return ImageEncoding(tokens=list(p.token_ids), image=p.pixel_values)


def encode_with_images(tokenizer: Any, mistral: MistralTokenizer, messages: list[dict[str, Any]],
                       reasoning_effort: str | None, continue_final_message: bool, tools: Any, tool_choice: Any,
                       fallback: ImageProcessor | None) -> tuple[list[int], list[Any]]:
    """(prompt ids, `image.ProcessedImage` per image in prompt order) of checked messages with image parts."""
    proc = tokenizer_image_processor(tokenizer, fallback)
    converted: list[dict[str, Any]] = []
    processed: dict[str, Any] = {}
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, (list, tuple)):
            converted.append(dict(msg))
            continue
        parts = []
        for j, part in enumerate(content):
            if part["type"] not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            src = image_source(part, where)
            key = f"mistral4-jax-image:{len(processed)}"
            processed[key] = proc.preprocess(src, f"{where} ({describe(src)})")
            parts.append({"type": "image_url", "image_url": {"url": key}})
        converted.append({**msg, "content": parts})
    request = build_request(converted, reasoning_effort, continue_final_message, tools, tool_choice)
    encoder = _ImageEncoder(proc, processed)
    instruct = mistral.instruct_tokenizer
    previous = getattr(instruct, "image_encoder", None)
    instruct.image_encoder = encoder
    try:
        ids = encode_request(mistral, request)
    finally:
        instruct.image_encoder = previous
    if sorted(encoder.used) != sorted(processed):
        raise ValueError(f"mistral-common encoded {len(encoder.used)} image chunks for {len(processed)} image parts")
    images = [processed[k] for k in encoder.used]
    n_img = sum(1 for t in ids if t == proc.image_token_id)
    if n_img != sum(p.num_features for p in images):
        raise ValueError(f"the prompt has {n_img} [IMG] tokens but its images give {sum(p.num_features for p in images)} "
                         "features")
    return ids, images
