"""Packing images of any sizes into one patch sequence for the vision tower (host side, numpy): the
`PackedImages` that `model.vision.encode` / `project` take, and the number of [IMG] tokens of an image."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .vision_config import VisionConfig

PAD_SEGMENT = 2**30
"""Segment id of padding rows (no image)."""


@dataclasses.dataclass(frozen=True)
class PackedImages:
    """Images packed into one patch sequence (host numpy), the input of `encode` / `project`.

    patches [S, K] float32 (patch pixels in (channel, row, column) order), positions [S, 2] int32
    (row, column), segments [S] int32 (image index, `PAD_SEGMENT` for padding), merge_index [M, W] int32
    (rows of each output token's window; padding tokens point at row 0). `grids` holds each image's
    (rows, columns) of patches; `num_patches` / `num_tokens` are the unpadded S and M.
    """

    patches: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    merge_index: np.ndarray
    grids: tuple[tuple[int, int], ...]
    num_patches: int
    num_tokens: int
    spatial_merge_size: int = 1

    @property
    def token_grids(self) -> list[tuple[int, int]]:
        """(rows, columns) of image tokens (merged patches) of each image."""
        s = self.spatial_merge_size
        return [(h // s, w // s) for h, w in self.grids]

    @property
    def tokens_per_image(self) -> list[int]:
        return [r * c for r, c in self.token_grids]


def num_image_tokens(height: int, width: int, vcfg: VisionConfig) -> tuple[int, int]:
    """(rows, columns) of image tokens for a preprocessed image of height x width pixels:
    (height // (patch * merge), width // (patch * merge)). Features per image = rows * columns; the
    prompt holds rows * (columns + 1) placeholders (see `image.image_token_ids`)."""
    m = vcfg.merged_patch_size
    return height // m, width // m


def _as_images(pixel_values: Any, image_sizes: Sequence[Sequence[int]] | None, vcfg: VisionConfig) -> list[np.ndarray]:
    if isinstance(pixel_values, (np.ndarray, jax.Array)) and np.ndim(pixel_values) == 3:
        pixel_values = [pixel_values]
    images = [np.asarray(x, dtype=np.float32) for x in pixel_values]
    if image_sizes is not None:
        if len(image_sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(image_sizes)} image_sizes")
        images = [x[:, : int(hw[0]), : int(hw[1])] for x, hw in zip(images, image_sizes)]
    for i, x in enumerate(images):
        if x.ndim != 3 or x.shape[0] != vcfg.num_channels:
            raise ValueError(f"image {i}: pixel values must be [{vcfg.num_channels}, H, W], got shape {x.shape}")
        if x.shape[1] < vcfg.merged_patch_size or x.shape[2] < vcfg.merged_patch_size:
            raise ValueError(f"image {i}: {x.shape[1]}x{x.shape[2]} pixels is smaller than one image token "
                             f"({vcfg.merged_patch_size}x{vcfg.merged_patch_size}); preprocess it first (image.preprocess)")
    return images


def pack_images(pixel_values: Any, vcfg: VisionConfig, image_sizes: Sequence[Sequence[int]] | None = None,
                bucket: int = 1) -> PackedImages:
    """Pack preprocessed images into one patch sequence.

    pixel_values: a list of [C, H, W] arrays (any sizes), or HF's padded batch [I, C, Hmax, Wmax] with
    `image_sizes` [(h, w)] per image (each image is cropped to its size, as HF's tower does). Pixels past
    the last whole patch are dropped (HF's conv + crop); rows/columns of patches past the last whole
    s x s window are encoded but not merged (HF's unfold). S is padded up to a multiple of `bucket`
    (padding rows: zero pixels, `PAD_SEGMENT`), M to S_padded // (s*s), so the shapes depend only on
    the bucket.
    """
    p, s = vcfg.patch_size, vcfg.spatial_merge_size
    patches, positions, segments, merges, grids = [], [], [], [], []
    offset = 0
    for i, x in enumerate(_as_images(pixel_values, image_sizes, vcfg)):
        c, hgt, wid = x.shape
        hp, wp = hgt // p, wid // p
        x = x[:, : hp * p, : wp * p].reshape(c, hp, p, wp, p).transpose(1, 3, 0, 2, 4).reshape(hp * wp, c * p * p)
        patches.append(x)
        rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
        positions.append(np.stack([rows.ravel(), cols.ravel()], axis=-1))
        segments.append(np.full((hp * wp,), i))
        br, bc, ki, kj = np.meshgrid(np.arange(hp // s), np.arange(wp // s), np.arange(s), np.arange(s), indexing="ij")
        merges.append((offset + (br * s + ki) * wp + (bc * s + kj)).reshape(-1, s * s))
        grids.append((hp, wp))
        offset += hp * wp
    if not patches:
        raise ValueError("no images to pack")
    n, m = offset, sum(len(x) for x in merges)
    total = -(-n // bucket) * bucket
    pad = total - n
    patches.append(np.zeros((pad, vcfg.patch_dim), np.float32))
    positions.append(np.zeros((pad, 2), np.int64))
    segments.append(np.full((pad,), PAD_SEGMENT))
    merges.append(np.zeros((total // (s * s) - m, s * s), np.int64))
    return PackedImages(
        patches=np.concatenate(patches).astype(np.float32), positions=np.concatenate(positions).astype(np.int32),
        segments=np.concatenate(segments).astype(np.int32), merge_index=np.concatenate(merges).astype(np.int32),
        grids=tuple(grids), num_patches=n, num_tokens=m, spatial_merge_size=s,
    )
