"""A strict, torch-free safetensors reader that memory-maps tensors of every dtype (bf16 and FP8 included).

File names come from untrusted indexes, so every check happens before a byte of tensor data is read:
the header length against the file size, each tensor's dtype, shape and byte range against the header
and the file, and shard paths against the checkpoint directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class SafetensorsFile:
    """One `.safetensors` file: header parsed and checked on open, tensors memory-mapped on `get`."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors file not found: {path}")
        size = os.path.getsize(path)
        if size < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ValueError(f"{path}: header length {n} is larger than the file ({size} bytes)")
            if n > _MAX_HEADER:
                raise ValueError(f"{path}: header length {n} exceeds the {_MAX_HEADER}-byte limit")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor {name!r} has a malformed or unsupported header entry {info!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if any(s < 0 for s in shape) or begin < 0 or end - begin != nbytes:
                raise ValueError(f"{path}: tensor {name!r} byte range {begin}..{end} does not match shape {shape} {info['dtype']}")
            if self._start + end > size:
                raise ValueError(
                    f"{path}: truncated file: tensor {name!r} ends at byte {self._start + end} but the file has {size} bytes"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def keys(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the memory-mapped file (no copy)."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[self._start + begin : self._start + end].view(dtype).reshape(shape)


def safe_child(directory: str, name: str, what: str) -> str:
    """`directory/name` if `name` (from an untrusted index) is a plain relative path that stays inside
    `directory` as written (no absolute path, no `..`), else ValueError. Symbolic links already in the
    directory are followed: the Hugging Face cache's snapshots link each file to `../../blobs/<hash>`."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        raise ValueError(f"{what}: invalid file name {name!r}")
    norm = os.path.normpath(name)
    if norm == os.curdir or norm.split(os.sep)[0] == os.pardir:
        raise ValueError(f"{what}: file name {name!r} leaves the checkpoint directory")
    return os.path.join(directory, norm)


class TensorIndex:
    """All tensors of a checkpoint directory by name, each read from the one file that holds it."""

    def __init__(self, files: dict[str, SafetensorsFile], where: dict[str, str]) -> None:
        self._files = files
        self._where = where

    @classmethod
    def open(cls, directory: str, index_name: str = "model.safetensors.index.json", single: str = "model.safetensors") -> TensorIndex:
        """Open `index_name` (sharded) or `single`; refuse pickle weights; check every name and shard."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        index_path = os.path.join(directory, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: 'weight_map' is not an object")
            files: dict[str, SafetensorsFile] = {}
            for shard in sorted(set(weight_map.values())):
                full = safe_child(directory, shard, index_path)
                if not shard.endswith(".safetensors"):
                    raise ValueError(f"{index_path}: shard {shard!r} is not a .safetensors file (pickle weights are refused)")
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"{index_path}: shard {shard!r} listed in the index is missing")
                files[shard] = SafetensorsFile(full)
            for name, shard in weight_map.items():
                if name not in files[shard]:
                    raise ValueError(f"{index_path}: tensor {name!r} is listed in shard {shard!r} but not stored there")
            return cls(files, dict(weight_map))
        single_path = os.path.join(directory, single)
        if os.path.isfile(single_path):
            f = SafetensorsFile(single_path)
            return cls({single: f}, {k: single for k in f.keys()})
        found = sorted(os.listdir(directory))
        pickles = [n for n in found if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(
                f"{directory}: only pickle weights found ({', '.join(pickles[:3])}); they are refused, never loaded. "
                "Save the checkpoint as safetensors (save_pretrained(..., safe_serialization=True))."
            )
        raise FileNotFoundError(f"{directory}: no {single} or {index_name} found")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafetensorsFile:
        return self._files[self._where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.file_of(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.file_of(name).get(name)
