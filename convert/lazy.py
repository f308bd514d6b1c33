"""Lazy source tensors: `hf.read_layer` run over names, shapes and dtypes only; data read later in pieces.

`LazyReader` is an `HFReader` whose `get` returns a `SourceTensor` (the stored tensor, its FP8 scale,
and the view ops that `read_layer` applies to it: `.T`, `.transpose`, `.reshape`, slicing) instead of
data, and whose `stack` returns a `Stacked` of per-expert tensors. Running `read_layer` with it checks
every name, shape and dtype of a layer without reading a byte of tensor data. `pieces()` then yields the
output in small pieces: one expert (leading index) at a time for [E, ...] tensors and row blocks for
large matrices, so that a fused [E, 2F, D] tensor is never held whole, in float32 or at all.

Reads go through the reader's memory map; after each piece the map's pages are dropped from this
process (`madvise(MADV_DONTNEED)`; they stay in the page cache), so that resident memory does not grow
with the bytes read.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

from mistral4_jax.weights.hf import HFReader, dequantize_fp8, fp8_block
from mistral4_jax.weights.safetensors import TensorIndex
from mistral4_jax.weights.quant import FP8_DTYPE_NAMES

_PIECE_BYTES = 32 * 1024 * 1024
"""Target float32 size of one piece of a 2-D tensor read in row blocks."""

Op = tuple[str, Any]


def _norm_key(key: Any, ndim: int) -> tuple[slice, ...]:
    """A basic-slicing key as one slice per axis (only slices and one Ellipsis are supported)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1 :]
    if len(key) > ndim or not all(isinstance(k, slice) for k in key):
        raise TypeError(f"unsupported index {key!r} on a lazy source tensor (slices only)")
    return key + (slice(None),) * (ndim - len(key))


def _after(shape: tuple[int, ...], op: Op) -> tuple[int, ...]:
    """The shape after one view op."""
    kind, arg = op
    if kind == "transpose":
        return tuple(shape[a] for a in (arg if arg is not None else reversed(range(len(shape)))))
    if kind == "reshape":
        new = list(arg)
        if -1 in new:
            new[new.index(-1)] = math.prod(shape) // -math.prod(new)
        if math.prod(new) != math.prod(shape):
            raise ValueError(f"cannot reshape {shape} to {tuple(arg)}")
        return tuple(new)
    return tuple(len(range(*k.indices(n))) for k, n in zip(_norm_key(arg, len(shape)), shape))


def _apply(x: np.ndarray, op: Op) -> np.ndarray:
    kind, arg = op
    if kind == "transpose":
        return x.transpose(arg)
    if kind == "reshape":
        return x.reshape(arg)
    return x[_norm_key(arg, x.ndim)]


def _lead_axis(ops: tuple[Op, ...], ndim: int) -> int | None:
    """Where the stored tensor's axis 0 ends up after `ops` if they keep it whole and unmerged, else None."""
    pos = 0
    for kind, arg in ops:
        if kind == "reshape":
            return None
        if kind == "transpose":
            pos = list(arg if arg is not None else reversed(range(ndim))).index(pos)
        elif _norm_key(arg, ndim)[pos] != slice(None):
            return None
    return pos


def _release(view: np.ndarray) -> None:
    """Drop the pages of the memory map behind `view` from this process (they stay in the page cache)."""
    base: Any = view
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """A stored tensor not read yet: `stored` in `index`, FP8 `scale` (float32) or None, view `ops`.

    `name` is the canonical HF name (for messages); `block` the FP8 block size of block scales.
    """

    index: TensorIndex
    stored: str
    name: str
    stored_shape: tuple[int, ...]
    dtype: np.dtype
    scale: np.ndarray | None
    block: tuple[int, int] = (128, 128)
    ops: tuple[Op, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.stored_shape
        for op in self.ops:
            shape = _after(shape, op)
        return shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _with(self, op: Op) -> SourceTensor:
        _after(self.shape, op)  # validates the op
        return dataclasses.replace(self, ops=self.ops + (op,))

    @property
    def T(self) -> SourceTensor:
        return self._with(("transpose", None))

    def transpose(self, *axes: int) -> SourceTensor:
        return self._with(("transpose", tuple(axes) or None))

    def reshape(self, *shape: int) -> SourceTensor:
        return self._with(("reshape", tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape))

    def __getitem__(self, key: Any) -> SourceTensor:
        return self._with(("getitem", key))

    # ---------------------------------------------------------------------------------- reading
    @property
    def is_fp8(self) -> bool:
        return self.dtype.name in FP8_DTYPE_NAMES

    @property
    def sources(self) -> tuple[SourceTensor, ...]:
        return (self,)

    def block_scale(self) -> tuple[int, int] | None:
        """The FP8 block size if the scale is a block scale, else None (per tensor / per row, or not FP8)."""
        return fp8_block(self.scale.shape, self.stored_shape, self.block, self.name) if self.is_fp8 else None

    def _rows_per_piece(self) -> int | None:
        """Stored rows per piece if reading in row blocks is possible, else None (read whole)."""
        n = self.stored_shape[0] if self.stored_shape else 0
        if not n or _lead_axis(self.ops, len(self.stored_shape)) is None:
            return None
        if self.is_fp8 and self.block_scale() is not None and not (len(self.stored_shape) >= 3 and self.scale.shape[0] == n):
            return None  # a 2-D block scale: blocks span rows
        if len(self.stored_shape) >= 3:
            return 1
        row_bytes = 4 * math.prod(self.stored_shape[1:])
        return max(1, _PIECE_BYTES // max(row_bytes, 1))

    def pieces(self) -> Iterator[Piece]:
        """The output in pieces along the stored axis 0 (one expert, or a block of rows), or whole."""
        rows = self._rows_per_piece()
        if rows is None:
            yield Piece(self, None, (...,))
            return
        pos = _lead_axis(self.ops, len(self.stored_shape))
        for a in range(0, self.stored_shape[0], rows):
            b = min(a + rows, self.stored_shape[0])
            yield Piece(self, slice(a, b), (slice(None),) * pos + (slice(a, b),))

    def _scale_rows(self, rows: slice | None) -> np.ndarray:
        """The part of the scale that belongs to stored rows `rows`."""
        if rows is None or self.scale.size == 1:
            return self.scale
        return self.scale[rows]

    def read(self, rows: slice | None, fp8_raw: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(values with ops applied, scale or None) of stored rows `rows` (None = all).

        Values are exact: float data in its stored dtype; FP8 dequantised to float32 as
        `float32(w) * scale`, unless `fp8_raw`, which returns the FP8 values and their scalar scale.
        """
        view = self.index.get(self.stored)
        try:
            w = view if rows is None else view[rows]
            scale = None
            if self.is_fp8:
                scale = self._scale_rows(rows)
                if fp8_raw:
                    if self.block_scale() is not None or scale.size != 1:
                        raise ValueError(f"FP8 tensor {self.name!r} has a {'block' if self.block_scale() else 'per-row'} "
                                         f"scale {self.scale.shape}; it cannot be kept as FP8 with one scale per "
                                         "tensor or expert: convert with --dtype bfloat16")
                    scale = scale.reshape(())
                else:
                    w, scale = dequantize_fp8(np.asarray(w), scale, self.name, self.block), None
            for op in self.ops:
                w = _apply(w, op)
            return np.array(w), scale
        finally:
            _release(view)


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Per-expert source tensors stacked along a new leading axis ([E, ...])."""

    parts: tuple[SourceTensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def name(self) -> str:
        return self.parts[0].name

    @property
    def is_fp8(self) -> bool:
        return all(p.is_fp8 for p in self.parts)

    @property
    def sources(self) -> tuple[SourceTensor, ...]:
        return self.parts

    def pieces(self) -> Iterator[Piece]:
        for e, part in enumerate(self.parts):
            yield Piece(part, None, (e,))


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of an output array: `tensor` rows `rows` (None = whole), written at `out[index]`."""

    tensor: SourceTensor
    rows: slice | None
    index: tuple[Any, ...]

    def out_rows(self, n: int) -> range:
        """The output's axis-0 indices this piece covers (the output has n rows)."""
        first = self.index[0]
        if first is Ellipsis:
            return range(n)
        return range(first, first + 1) if isinstance(first, int) else range(*first.indices(n))

    def values(self) -> np.ndarray:
        return self.tensor.read(self.rows)[0]

    def fp8(self) -> tuple[np.ndarray, np.ndarray]:
        w, scale = self.tensor.read(self.rows, fp8_raw=True)
        return w, scale


Lazy = SourceTensor | Stacked


class LazyReader(HFReader):
    """An `HFReader` that checks names, shapes and dtypes now and returns `SourceTensor`s to read later."""

    def get(self, name: str, shape: tuple[int, ...]) -> SourceTensor:
        dtype = self.check(name, shape)
        self.used.add(name)
        scale = None
        if dtype.name in FP8_DTYPE_NAMES:
            scale = self._scale_of(name, tuple(shape))
            fp8_block(scale.shape, tuple(shape), self.fp8_block, name)
        return SourceTensor(self.index, self._actual[name], name, tuple(shape), dtype, scale, self.fp8_block)

    def stack(self, arrays: list[Any]) -> Stacked:
        return Stacked(tuple(arrays))
