"""The one on-disk layout of a converted Mistral 4 checkpoint: how it is written, checked and restored.

    DST/
      manifest.json     format and converter version, source (path, format, sha256 of its index and
                        safetensors headers), dtype, float_weights (FP8: see below), tensor and
                        parameter counts, copied files
      config.json       our `Mistral4Config` (`to_dict()`)
      params/           one Orbax (v1) PyTree checkpoint, uncompressed:
                          embed, final_norm/scale, lm_head            as in the model's parameter tree
                          layers_dense/<j>/..., layers_moe/<j>/...     one subtree per layer j of a group
                                                                      (the model's leaves without the layer axis)
                          vision/{patch_embed, layers, projector}/...  the vision tower (layers stacked) and projector
                                                                      of a multimodal checkpoint (not with --text-only)
      vision_config.json  our `vision.VisionConfig` (`to_dict()`), only when vision/ is stored
      tekken.json, tokenizer.json, chat_template.jinja, ...           copied verbatim from the source
      source_config.json                                              the source's config.json or params.json

The parameters are stored in the storage format of the model for the manifest's dtype: with
"float8_e4m3fn" the model's quantised weights (`QuantArray`s) are stored as two arrays, the float8 values
under the weight's name and the float32 scale beside them as `<name>_scale` (per tensor [1, ...], per expert
[E, 1, 1]; `to_disk` / `from_disk`), and everything else is bfloat16, except the weights the manifest lists
in `float_weights` ("layers_moe/attn/kv_a_proj": their source was not FP8), which are bfloat16 without a
scale (`model.param_specs`). Vision arrays are never FP8: bfloat16 for an FP8
checkpoint, else the manifest's dtype (`vision_dtype`).

Layers are stored one subtree per layer so that the converter writes one layer at a time (Orbax partial
saves, `CheckpointWriter`) and never holds more. `restore_params` stacks them back into the model's
[layers, ...] arrays on device: each layer is read straight into its target sharding (the stacked
array's sharding without the layer axis) and written in place into the preallocated stacked array, so no
array is ever assembled whole on one host or device first, and any mesh works whatever wrote the files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from .. import model as M
from ..model import vision
from ..model.vision import vision_dtype
from ..config import Mistral4Config
from .quant import QuantArray, dequantize, is_fp8, is_quant

log = logging.getLogger(__name__)

FORMAT = "mistral4-jax/orbax"
FORMAT_VERSION = 2
"""v2: lm_head stored [vocab, embed] (v1 had [embed, vocab]); convert again from the HF checkpoint."""
MANIFEST = "manifest.json"
CONFIG = "config.json"
PARAMS = "params"
GLOBALS = "globals"
VISION = "vision"
VISION_CONFIG = "vision_config.json"
JOURNAL = "journal.json"
_CHUNK_BYTES = 64 * 1024 * 1024
"""Orbax chunk size: a sharded restore reads only the chunks its shards overlap."""

SCALE_SUFFIX = "_scale"
"""On disk, a `QuantArray` weight `<name>` is the array `<name>` (values) and `<name>_scale` beside it."""

ShardingSpec = Any
"""None (one device), a `Sharding` for every array, a pytree of `Sharding`s matching the parameter tree,
or a callable `(logical_axes: tuple[str | None, ...], leaf: jax.ShapeDtypeStruct) -> Sharding`."""


# ------------------------------------------------------------------------------------------- layout
def to_disk(tree: Any) -> Any:
    """The on-disk form of a parameter tree (arrays, `ShapeDtypeStruct`s or shardings): each `QuantArray`
    `<name>` as `<name>` (its values) and `<name>_scale` beside it."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, value in tree.items():
        if is_quant(value):
            out[name], out[name + SCALE_SUFFIX] = value.values, value.scale
        else:
            out[name] = to_disk(value)
    return out


def from_disk(tree: Any, like: Any) -> Any:
    """`to_disk` undone: the tree read from disk with each weight that `like` (the model's tree) holds as a
    `QuantArray` put back together from `<name>` and `<name>_scale`."""
    if not isinstance(like, dict):
        return tree
    return {name: QuantArray(tree[name], tree[name + SCALE_SUFFIX]) if is_quant(sub) else from_disk(tree[name], sub)
            for name, sub in like.items()}


def pieces(cfg: Mistral4Config, vcfg: Any = None) -> list[str]:
    """The pieces a checkpoint is written in, in order: "globals", "vision" when `vcfg` (a
    `vision.VisionConfig`) is given, then "layers_moe/0", ... per layer."""
    return [GLOBALS] + ([VISION] if vcfg else []) + [f"{name}/{j}" for name, n, _ in M.layer_groups(cfg) for j in range(n)]


def vision_abstract(vcfg: Any, dtype: Any) -> dict[str, Any]:
    """The vision piece (tower + projector, layers stacked) as `jax.ShapeDtypeStruct`s for a checkpoint of `dtype`."""
    return vision.abstract_params(vcfg, vision_dtype(dtype))


def piece_abstract(cfg: Mistral4Config, dtype: Any, piece: str, abstract: dict[str, Any] | None = None,
                   vcfg: Any = None) -> dict[str, Any]:
    """The arrays of one piece as `jax.ShapeDtypeStruct`s, as the model holds them (`QuantArray`s; per-layer
    pieces without the layer axis; the "vision" piece needs `vcfg`)."""
    if piece == VISION:
        if vcfg is None:
            raise ValueError("the vision piece needs a vision config")
        return vision_abstract(vcfg, dtype)
    abstract = M.abstract_params(cfg, dtype) if abstract is None else abstract
    if piece == GLOBALS:
        return {k: v for k, v in abstract.items() if not k.startswith("layers_")}
    group, _ = piece.split("/")
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), abstract[group])


def nest(piece: str, tree: dict[str, Any]) -> dict[str, Any]:
    """A piece's subtree placed at its position in the on-disk tree ({"layers_moe": {"3": tree}})."""
    if piece == GLOBALS:
        return tree
    if piece == VISION:
        return {VISION: tree}
    group, j = piece.split("/")
    return {group: {j: tree}}


def disk_abstract(cfg: Mistral4Config, dtype: Any, vcfg: Any = None, float_weights: Sequence[str] = ()) -> dict[str, Any]:
    """The whole stored parameter tree as `jax.ShapeDtypeStruct`s, pieces laid out as on disk but `QuantArray`s
    whole (`to_disk` gives the on-disk names); with the vision piece if `vcfg`."""
    abstract = M.abstract_params(cfg, dtype, float_weights)
    out = piece_abstract(cfg, dtype, GLOBALS, abstract)
    for group, n, _ in M.layer_groups(cfg):
        layer = piece_abstract(cfg, dtype, f"{group}/0", abstract)
        out[group] = {str(j): layer for j in range(n)}
    if vcfg is not None:
        out[VISION] = vision_abstract(vcfg, dtype)
    return out


def count(tree: Any) -> tuple[int, int]:
    """(number of arrays, number of parameters) of a tree of arrays; a `QuantArray` is two arrays (values and
    scale) and as many parameters as values."""
    weights = jax.tree_util.tree_leaves(tree, is_leaf=is_quant)
    return len(jax.tree_util.tree_leaves(tree)), sum(int(np.prod(x.shape)) for x in weights)


# ------------------------------------------------------------------------------------------ orbax
def _ocp():
    from orbax.checkpoint import v1 as ocp

    return ocp


@contextlib.contextmanager
def orbax_context(partial_load: bool = False) -> Iterator[Any]:
    """An Orbax context: no compression, no defensive host copies (the caller does not mutate arrays being
    saved), chunks of at most 64 MiB; `partial_load` to read a subtree."""
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    ctx.memory.deepcopy_host_arrays = False
    ctx.pytree.loading.partial_load = partial_load
    with ctx:
        yield ocp


def on_disk(path: str | os.PathLike) -> dict[str, Any]:
    """The stored parameter tree's metadata (`.shape`, `.dtype` per array)."""
    with orbax_context() as ocp:
        return ocp.metadata(os.path.join(os.path.abspath(path), PARAMS)).metadata


def verify(path: str | os.PathLike, cfg: Mistral4Config, dtype: Any, vcfg: Any = None,
           float_weights: Sequence[str] = ()) -> tuple[int, int]:
    """Check the arrays stored under `path` against `cfg`/`dtype`/`float_weights` (and the vision piece of
    `vcfg`, if given): names, shapes, dtypes; nothing missing or extra. Returns (tensor count, parameter
    count), vision included; raises ValueError naming the first difference."""
    expected = dict(_flat(to_disk(disk_abstract(cfg, dtype, vcfg, float_weights))))
    found = dict(_flat(on_disk(path)))
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            raise ValueError(f"{path}: tensor {name!r} is missing from the checkpoint")
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name!r} in the checkpoint")
        e, f = expected[name], found[name]
        if tuple(e.shape) != tuple(f.shape) or np.dtype(e.dtype) != np.dtype(f.dtype):
            raise ValueError(f"{path}: tensor {name!r} is {np.dtype(f.dtype)}{list(f.shape)}, "
                             f"expected {np.dtype(e.dtype)}{list(e.shape)}")
    return count(disk_abstract(cfg, dtype, vcfg, float_weights))


def _flat(tree: Any) -> Iterator[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    for path, leaf in leaves:
        yield "/".join(str(getattr(k, "key", k)) for k in path), leaf


# ------------------------------------------------------------------------------------------ reading
def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path` is a directory written by the converter (it has a manifest.json)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a converted checkpoint, checked to be of our format and version."""
    file = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"not a converted checkpoint (no {MANIFEST}): {path}")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                         f"expected {FORMAT!r} v{FORMAT_VERSION} (convert the source checkpoint again)")
    return manifest


def read_config(path: str | os.PathLike) -> Mistral4Config:
    return Mistral4Config.from_json(os.path.join(os.fspath(path), CONFIG))


def read_vision_config(path: str | os.PathLike) -> Any:
    """The `vision.VisionConfig` of a converted checkpoint, or None if it stores no vision tower."""
    file = os.path.join(os.fspath(path), VISION_CONFIG)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            return vision.VisionConfig.from_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None


def restore_vision(path: str | os.PathLike, dtype: Any = None, sharding: Sharding | None = None) -> dict[str, Any]:
    """The vision parameter tree (tower + projector, jax arrays) of a converted checkpoint, read as `dtype`
    (None: as stored; FP8 is not a vision dtype and means bfloat16) onto `sharding` (default: one device).
    ValueError if the checkpoint has no vision tower."""
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    vcfg = read_vision_config(path)
    if vcfg is None:
        raise ValueError(f"{path}: the checkpoint has no vision tower (text-only, or converted with --text-only)")
    target = vision_dtype(manifest["dtype"] if dtype is None else dtype)
    abstract = vision_abstract(vcfg, target)
    sharding = SingleDeviceSharding(jax.devices()[0]) if sharding is None else sharding
    with orbax_context(partial_load=True) as ocp:
        tree = ocp.load(os.path.join(path, PARAMS), {VISION: _target(abstract, jax.tree_util.tree_map(lambda _: sharding, abstract))})
    log.info("restored the vision tower (%s) from %s", np.dtype(target).name, path)
    return tree[VISION]


def resolve_shardings(shardings: ShardingSpec, cfg: Mistral4Config, dtype: Any, abstract: dict[str, Any]) -> dict[str, Any]:
    """A tree of `Sharding`s matching `abstract` (the stacked parameter tree) from a `ShardingSpec`."""
    if shardings is None:
        shardings = SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, Sharding):
        return jax.tree_util.tree_map(lambda _: shardings, abstract)
    if callable(shardings):
        axes = M.param_axes(cfg, dtype, M.stored_float_weights(cfg, abstract))
        return jax.tree_util.tree_map(lambda a, s: shardings(tuple(a), s), axes, abstract,
                                      is_leaf=lambda a: isinstance(a, tuple))
    expected = jax.tree_util.tree_structure(abstract)
    got = jax.tree_util.tree_structure(shardings, is_leaf=lambda s: isinstance(s, Sharding))
    if got != expected:
        raise ValueError(f"shardings do not match the parameter tree: got {got}, expected {expected}")
    return shardings


def _layer_sharding(s: Sharding, ndim: int) -> Sharding:
    """The sharding of one layer of a stacked [layers, ...] array sharded as `s` (the layer axis dropped)."""
    if isinstance(s, NamedSharding):
        spec = tuple(s.spec) + (None,) * (ndim - len(s.spec))
        return NamedSharding(s.mesh, PartitionSpec(*spec[1:]), memory_kind=s.memory_kind)
    if isinstance(s, SingleDeviceSharding):
        return s
    raise ValueError(f"unsupported sharding {type(s).__name__} for a stacked layer array (use NamedSharding)")


def _target(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _dequantize(stored: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """`QuantArray`s dequantised (float32 product, as the model computes in float32) and every array cast to dtype."""
    return jax.tree_util.tree_map(lambda w: dequantize(w, jnp.float32).astype(dtype), stored, is_leaf=is_quant)


def restore_params(path: str | os.PathLike, dtype: Any = None, shardings: ShardingSpec = None) -> tuple[Mistral4Config, dict[str, Any]]:
    """(config, parameter tree of jax arrays) of a converted checkpoint, each array in its target sharding.

    dtype: None keeps the stored dtype; a float checkpoint may be read as another float dtype (cast while
    reading); an FP8 checkpoint is read as FP8 (with its scales) or dequantised to a float dtype.
    shardings: see `ShardingSpec`; shardings of stacked layer arrays may split any axis, the layer axis too.
    """
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    cfg = read_config(path)
    stored = jnp.dtype(manifest["dtype"])
    target = stored if dtype is None else jnp.dtype(dtype)
    if is_fp8(target) and not is_fp8(stored):
        raise ValueError(f"{path}: stored as {stored.name}; FP8 weights need a checkpoint converted with "
                         "--dtype float8_e4m3fn")
    dequantize = is_fp8(stored) and not is_fp8(target)
    floats = manifest.get("float_weights", [])
    abstract = M.abstract_params(cfg, target, floats)
    stored_abstract = abstract if stored == target else M.abstract_params(cfg, stored, floats)
    shard_tree = resolve_shardings(shardings, cfg, target, abstract)
    params_path = os.path.join(path, PARAMS)
    with orbax_context(partial_load=True) as ocp:
        params = {}
        glob_abstract = piece_abstract(cfg, target, GLOBALS, abstract)
        glob_target = to_disk(_target(glob_abstract, {k: shard_tree[k] for k in glob_abstract}))
        params.update(from_disk(ocp.load(params_path, glob_target), glob_abstract))
        for group, n, _ in M.layer_groups(cfg):
            params[group] = _restore_group(ocp, params_path, group, n, abstract[group], stored_abstract[group],
                                           shard_tree[group], target if dequantize else None)
    log.info("restored %d layers (%s as %s) from %s", cfg.num_hidden_layers, stored.name, target.name, path)
    return cfg, params


def _restore_group(ocp: Any, params_path: str, group: str, n: int, abstract: Any, stored_abstract: Any,
                   shardings: Any, dequantize_to: Any) -> Any:
    """Stacked [n, ...] arrays of one layer group, filled one layer at a time in place (donated buffer)."""
    layer_shardings = jax.tree_util.tree_map(lambda s, a: _layer_sharding(s, len(a.shape)), shardings, abstract)
    per_layer = lambda tree: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
    stacked = jax.tree_util.tree_map(lambda a, s: jnp.zeros(a.shape, a.dtype, device=s), abstract, shardings)
    if dequantize_to is None:
        read = per_layer(abstract)  # (Orbax casts a float checkpoint while reading)
        layer_target, convert = _target(read, layer_shardings), None
    else:
        read = per_layer(stored_abstract)
        layer_target = _target(read, _stored_shardings(read, layer_shardings))
        convert = jax.jit(lambda t: _dequantize(t, dequantize_to), out_shardings=layer_shardings)
    for j in range(n):
        layer = from_disk(ocp.load(params_path, {group: {str(j): to_disk(layer_target)}})[group][str(j)], read)
        if convert is not None:
            layer = convert(layer)
        stacked = jax.tree_util.tree_map(lambda b, x: _insert(b, x, j), stacked, layer)
    return stacked


@functools.partial(jax.jit, donate_argnums=0)
def _insert(stacked: jax.Array, layer: jax.Array, j: jax.Array) -> jax.Array:
    """stacked[j] = layer, in place (the stacked buffer is donated; its sharding is kept)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), j, 0)


def _stored_shardings(stored_abstract: dict[str, Any], layer_shardings: dict[str, Any]) -> dict[str, Any]:
    """Per-layer shardings for the stored FP8 tree, from its float targets': a `QuantArray`'s values as the
    float weight, its scale like the weight on the axes it keeps (size-1 axes replicated)."""
    def scale_sharding(w: Sharding, shape: tuple[int, ...]) -> Sharding:
        if not isinstance(w, NamedSharding):
            return w
        spec = tuple(w.spec) + (None,) * (len(shape) - len(w.spec))
        return NamedSharding(w.mesh, PartitionSpec(*(a if n > 1 else None for a, n in zip(spec, shape))),
                             memory_kind=w.memory_kind)

    return jax.tree_util.tree_map(lambda a, w: QuantArray(w, scale_sharding(w, a.scale.shape)) if is_quant(a) else w,
                                  stored_abstract, layer_shardings, is_leaf=is_quant)


def describe(path: str | os.PathLike) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], str]]]:
    """(manifest, [(array name, shape, dtype)]) of a converted checkpoint, for `mistral4-jax inspect`."""
    manifest = read_manifest(path)
    arrays = [(name, tuple(m.shape), np.dtype(m.dtype).name) for name, m in _flat(on_disk(path))]
    return manifest, arrays
