"""Image preprocessing for the Pixtral tower (Pillow + numpy) and the `[IMG]` token layout.

Equal to transformers' Pixtral image processor as `Mistral3`'s processor (`PixtralProcessor`) runs it in
transformers 5.24 with the PIL backend (`PixtralImageProcessorPil`, `patch_size` = patch * spatial_merge):

1. RGB: an image with an alpha band (or a `transparency` entry) is converted to RGBA and alpha-composited
   onto white (`PIL.Image.alpha_composite`); other images are converted with `convert("RGB")`. numpy
   RGBA arrays are blended as transformers blends arrays: round(a/255 * rgb + (1 - a/255) * 255).
2. Size: if the longest edge exceeds `longest_edge`, both sides are scaled by that ratio and floored;
   then each side is rounded UP to a multiple of patch * merge (28 for the real model). The aspect ratio
   is therefore not exactly kept. (mistral-common rounds instead of flooring: `rounding="round"`.)
3. Bicubic resize (Pillow `BICUBIC`, always applied, also to the same size), x 1/255 (in float64, then
   float32), normalise with the CLIP mean / std in float32; output [3, H, W] float32.

Deviations, on purpose: a side that would be floored to 0 pixels (aspect ratios beyond ~1:1540) is kept
at 1 pixel (transformers fails there); 16/32-bit integer and float images (modes I, I;16*, F) are
rejected (Pillow would clip them to 255, a white image). EXIF orientation is not applied (as transformers'
image processor and mistral-common; transformers' `load_image` for URLs/paths does apply it, and converts
RGBA with a plain `convert("RGB")`, which drops the alpha instead of compositing).

Token layout of an image of H x W pixels after preprocessing, with rows = H / 28 and cols = W / 28:
`([IMG] * cols + [IMG_BREAK]) * rows` with the last `[IMG_BREAK]` replaced by `[IMG_END]`: rows * (cols + 1)
tokens, of which rows * cols are `[IMG]` (one per image feature, row-major).

Image sources: file paths (str / os.PathLike, optionally `file://`), bytes, base64 data URIs
(`data:image/png;base64,...`), PIL images, numpy uint8 arrays [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
Every bad input raises ValueError naming the image.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Literal, Union

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
"""Pillow modes we convert to RGB; high bit-depth modes (I, I;16*, F) and exotic ones are rejected."""

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


# ------------------------------------------------------------------------------------------- loading
def describe(src: Any) -> str:
    """A short human-readable name of an image source, for error messages."""
    if isinstance(src, str):
        return src[:48] + "..." if src.startswith("data:") and len(src) > 48 else src
    if isinstance(src, os.PathLike):
        return os.fspath(src)  # type: ignore[return-value]
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL {src.mode} image {src.width}x{src.height}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {name}: too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise ValueError(f"image {name}: cannot decode the image data ({type(e).__name__}: {e})") from None
    return img


def _data_uri(uri: str, name: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError(f"image {name}: a data URI must look like 'data:image/png;base64,<data>'")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image {name}: the data URI is not valid base64 ({e})") from None


def open_image(src: ImageSource, name: str | None = None) -> Image.Image | np.ndarray:
    """The decoded image of a source: a PIL image (files, bytes, data URIs, PIL inputs) or the numpy array.

    ValueError naming the image for missing files, URLs, corrupt or truncated data and unsupported types.
    """
    name = describe(src) if name is None else name
    if isinstance(src, (Image.Image, np.ndarray)):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(bytes(src), name)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith("data:"):
            return _decode(_data_uri(path, name), name)
        if path.startswith(("http://", "https://")):
            raise ValueError(f"image {name}: URLs are not fetched; download the image and pass the file or bytes")
        if path.startswith("file://"):
            path = path[len("file://"):]
        if not os.path.isfile(path):
            raise ValueError(f"image {name}: no such file")
        with open(path, "rb") as f:
            return _decode(f.read(), name)
    raise ValueError(f"image {name}: unsupported image type {type(src).__name__} (expected a path, bytes, a data URI, "
                     "a PIL image or a uint8 numpy array)")


def _pil_to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"image {name}: zero-sized image ({img.width}x{img.height})")
    if img.mode not in SUPPORTED_MODES:
        raise ValueError(f"image {name}: unsupported image mode {img.mode!r} (supported: {', '.join(SUPPORTED_MODES)}; "
                         "convert 16-bit or float images to 8-bit first)")
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - Pillow conversion failures have various types
        raise ValueError(f"image {name}: cannot convert mode {img.mode!r} to RGB ({type(e).__name__}: {e})") from None


def _array_to_rgb(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ValueError(f"image {name}: numpy images must be uint8 (0..255), got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"image {name}: numpy images must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image {name}: zero-sized image ({a.shape[1]}x{a.shape[0]})")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def load_rgb(src: ImageSource, name: str | None = None) -> Image.Image:
    """A source as an 8-bit RGB PIL image (alpha composited onto white). ValueError naming the image."""
    name = describe(src) if name is None else name
    img = open_image(src, name)
    if isinstance(img, np.ndarray):
        return _array_to_rgb(img, name)
    return _pil_to_rgb(img, name)


# ------------------------------------------------------------------------------------ sizes, tokens
def resize_target(height: int, width: int, longest_edge: int, patch: int,
                  rounding: Literal["floor", "round"] = "floor") -> tuple[int, int]:
    """(H, W) after preprocessing an image of height x width: scaled down (never up) so that the longest
    edge fits `longest_edge` (sides floored as transformers does, or rounded as mistral-common does),
    then each side rounded up to a multiple of `patch` (= patch_size * spatial_merge_size)."""
    ratio = max(height / longest_edge, width / longest_edge)
    h, w = float(height), float(width)
    if ratio > 1:
        if rounding == "floor":
            h, w = math.floor(height / ratio), math.floor(width / ratio)
        elif rounding == "round":
            h, w = round(height / ratio), round(width / ratio)
        else:
            raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    h, w = max(int(h), 1), max(int(w), 1)
    return ((h - 1) // patch + 1) * patch, ((w - 1) // patch + 1) * patch


def image_token_ids(rows: int, cols: int, image_token_id: int = 10, break_token_id: int = 12,
                    end_token_id: int = 13) -> list[int]:
    """The placeholder ids of one image with rows x cols image tokens: per row `[IMG]` * cols then
    `[IMG_BREAK]`, the last `[IMG_BREAK]` replaced by `[IMG_END]` (rows * (cols + 1) ids)."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"an image needs at least one token row and column, got {rows}x{cols}")
    ids = ([image_token_id] * cols + [break_token_id]) * rows
    ids[-1] = end_token_id
    return ids


# ------------------------------------------------------------------------------------- processing
@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """One preprocessed image: pixel_values [3, H, W] float32, its token grid and placeholder ids."""

    pixel_values: np.ndarray
    rows: int
    cols: int
    token_ids: list[int]
    original_size: tuple[int, int]
    name: str

    @property
    def num_features(self) -> int:
        """Image features (= `[IMG]` tokens) of this image: rows * cols."""
        return self.rows * self.cols


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Pixtral preprocessing settings; `from_vision_config` reads them from a `vision.VisionConfig`.

    `longest_edge` is the processor's `size.longest_edge` (1540 for Mistral Small 3.1 / 4: the vision
    config's `image_size`). `rounding` = "floor" equals transformers; "round" equals mistral-common's
    token counts (its pixels come from OpenCV's bicubic, which we do not reproduce).
    """

    patch_size: int = 14
    spatial_merge_size: int = 2
    longest_edge: int = 1540
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD
    rounding: Literal["floor", "round"] = "floor"
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13

    @classmethod
    def from_vision_config(cls, vcfg: Any, **overrides: Any) -> ImageProcessor:
        """Settings from a `VisionConfig` (patch_size, spatial_merge_size, image_size, token ids)."""
        kwargs = dict(patch_size=vcfg.patch_size, spatial_merge_size=vcfg.spatial_merge_size,
                      longest_edge=vcfg.image_size, image_token_id=vcfg.image_token_index,
                      image_break_token_id=vcfg.image_break_token_index, image_end_token_id=vcfg.image_end_token_index)
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def merged_patch_size(self) -> int:
        return self.patch_size * self.spatial_merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) in pixels after preprocessing an image of height x width."""
        return resize_target(height, width, self.longest_edge, self.merged_patch_size, self.rounding)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of image tokens for an ORIGINAL image of height x width pixels."""
        h, w = self.target_size(height, width)
        return h // self.merged_patch_size, w // self.merged_patch_size

    def token_ids(self, height: int, width: int) -> list[int]:
        """Placeholder ids for an ORIGINAL image of height x width pixels."""
        return image_token_ids(*self.token_grid(height, width), self.image_token_id, self.image_break_token_id,
                               self.image_end_token_id)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, H, W]: x / 255 (float64, then float32), (x - mean) / std (float32)."""
        x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def preprocess(self, src: ImageSource, name: str | None = None) -> ProcessedImage:
        """Load, convert to RGB, resize (bicubic) and normalise one image. ValueError naming the image."""
        name = describe(src) if name is None else name
        img = load_rgb(src, name)
        h, w = self.target_size(img.height, img.width)
        resized = np.asarray(img.resize((w, h), resample=Image.Resampling.BICUBIC))
        rows, cols = h // self.merged_patch_size, w // self.merged_patch_size
        ids = image_token_ids(rows, cols, self.image_token_id, self.image_break_token_id, self.image_end_token_id)
        log.debug("image %s: %dx%d -> %dx%d pixels, %dx%d tokens", name, img.width, img.height, w, h, cols, rows)
        return ProcessedImage(self.normalize(resized), rows, cols, ids, (img.height, img.width), name)

    def __call__(self, images: Sequence[ImageSource] | ImageSource) -> list[ProcessedImage]:
        """Preprocess several images; errors name the image as "image <i> (<source>)"."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [self.preprocess(x, f"{i} ({describe(x)})") for i, x in enumerate(images)]
