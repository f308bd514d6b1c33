"""The conversion: plan every output array lazily (checking the whole source first), then write one
piece (the globals, then one layer) at a time through `weights.writer.CheckpointWriter`.

Peak memory is one layer in the output dtype plus one piece of source data (one expert, or a block of
rows) and its float32 dequantisation: arrays are filled piece by piece in place.

Output dtypes: "bfloat16", "float16" and "float32" hold exact values (float sources cast, FP8 sources
dequantised as `float32(w) * scale`, then rounded to the output dtype; a value beyond float16's range is
an error). "float8_e4m3fn" is the model's FP8 storage (`fp8_float_weights` decides it per weight):
- every FP8 source tensor (per-tensor or per-expert scale) is kept bit for bit with its scale, however
  our layout transposes, reshapes or splits it (k_b_proj and v_b_proj share kv_b_proj's scale);
- a weight FP8 stores quantised (a `QuantArray`) whose source is bf16/float in an FP8 checkpoint (the
  released checkpoint keeps `kv_a_proj_with_mqa` in bf16) is stored in bfloat16 as it is, not re-quantised; the manifest
  lists it in `float_weights`;
- a source without any FP8 weight is quantised: scale `amax / 448` per tensor (per expert for the routed
  experts);
- refused, naming the tensor: block-scaled or e5m2 FP8 sources, FP8 sources of weights the model keeps in
  bfloat16 (norms, router, embedding, lm_head), and one weight FP8 in some layers or experts but not others.

Vision (a multimodal source, unless `text_only`): the Pixtral tower and projector, from HF or native names
(`vision.read_vision_params`), are one more piece ("vision", written right after the globals so that a
bad vision tensor fails early), stored in bfloat16 for "float8_e4m3fn" and in the output dtype otherwise;
the vision config goes to `vision_config.json`. That piece is read whole (~0.4 B parameters, float32 while
it is laid out), unlike the text layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import mistral4_jax
from mistral4_jax.weights import checkpoint as ckpt
from mistral4_jax import model as M
from mistral4_jax.model.vision import vision_dtype
from mistral4_jax.model.vision_config import VisionConfig
from mistral4_jax.weights import hf
from mistral4_jax.weights.vision import read_vision_params
from mistral4_jax.weights.writer import CheckpointWriter, temporary_path
from mistral4_jax.weights.quant import QuantArray, is_quant, is_quantized

from .cli import OUTPUT_DTYPES
from .lazy import Lazy, LazyReader, SourceTensor
from .source import Source, open_source

log = logging.getLogger(__name__)

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
KILL_AFTER_ENV = "MISTRAL4_JAX_CONVERT_KILL_AFTER"
"""Testing hook: SIGKILL this process right after the N-th piece is written (before the journal records it)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) during `convert`; the message says what was kept (a temporary directory to --resume)."""


class _Sigint:
    """SIGINT handling of one conversion (main thread only; elsewhere, or where SIGINT is ignored, it is left
    alone).

    While source tensors are read (`reading()`, and before anything is written) SIGINT raises `Interrupted`
    at once. While files are written (journal, Orbax saves and finalize, which run in threads, the final
    rename) it is only recorded, and `check()` raises once the write is complete: whatever the moment,
    the temporary directory stays consistent for `--resume`, and no exception ever runs through Orbax.
    """

    def __init__(self, tmp: str, dst: str) -> None:
        self.tmp, self.dst = tmp, dst
        self.pending = False
        self.immediate = True
        self.completed = False
        self._previous: Any = None

    def __enter__(self) -> _Sigint:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending = True
        if self.immediate:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        if self.completed:
            raise Interrupted(f"the conversion had completed: {self.dst} is complete")
        if os.path.isdir(self.tmp):
            raise Interrupted(f"partial conversion kept in {self.tmp}; rerun with --resume to finish it")
        raise Interrupted("nothing was written")

    def writing(self) -> None:
        """From now on SIGINT waits for the write in progress (see `reading`)."""
        self.immediate = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A stretch that only reads: SIGINT raises at once."""
        self.check()
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False


def plan(source: Source) -> dict[str, Any]:
    """{piece: tree of lazy source tensors} for the whole checkpoint; every tensor's name, shape and dtype
    is checked here, and every source tensor must be used (vision tensors aside)."""
    cfg = source.config
    r = LazyReader(source.index, source.path, source.fp8_block)
    out: dict[str, Any] = {ckpt.GLOBALS: hf.read_globals(r, cfg)}
    for group, idx in hf.layer_groups(cfg):
        for j, i in enumerate(idx):
            out[f"{group}/{j}"] = hf.read_layer(r, i, cfg)
    hf.check_unexpected(r, cfg)
    return out


def fp8_float_weights(cfg: Any, lazy: dict[str, Any]) -> tuple[str, ...]:
    """The `float_weights` of an FP8 conversion of the planned source `lazy` ({piece: lazy tree}): the
    weights FP8 stores quantised (`model.quantized_paths`: "layers_moe/attn/kv_a_proj") whose sources are all
    bf16/float while other weights of the source are FP8 (stored in bfloat16, not re-quantised). A source without any FP8 weight
    gives () (all of them are quantised). ValueError for a weight FP8 in some layers or experts but not in
    others, and for an FP8 source of a weight the model stores in bfloat16."""
    quantized = set(M.quantized_paths(cfg))
    sources: dict[str, list[SourceTensor]] = {}
    for piece, tree in lazy.items():
        group = piece.split("/")[0]
        for path, leaf in _flat(tree):
            if f"{group}/{path}" in quantized:
                sources.setdefault(f"{group}/{path}", []).extend(leaf.sources)
            elif fp8 := [t for t in leaf.sources if t.is_fp8]:
                raise ValueError(f"tensor {fp8[0].name!r} is FP8, but the model stores {piece}/{path} in bfloat16, "
                                 "so it cannot be kept bit for bit: convert with --dtype float32 or bfloat16")
    floats = []
    for path, ts in sources.items():
        fp8, other = [t for t in ts if t.is_fp8], [t for t in ts if not t.is_fp8]
        if fp8 and other:
            raise ValueError(f"tensor {fp8[0].name!r} is FP8 but {other[0].name!r} is {other[0].dtype.name}: {path} "
                             "cannot be stored as one FP8 array; convert with --dtype bfloat16 or float32")
        if other:
            floats.append(path)
    if len(floats) == len(sources):
        log.info("the source has no FP8 weights: quantising them to FP8 (scale amax/448 per tensor or expert)")
        return ()
    return tuple(sorted(floats))


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Lazy]]:
    """(path, lazy leaf) of a planned tree."""
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{name}/")
        else:
            yield prefix + name, value


def _check(lazy: Any, target: dict[str, Any], where: str) -> None:
    """Lazy tree vs target tree: same names and shapes; FP8 targets must be representable."""
    for name, spec in target.items():
        if name not in lazy:
            raise ValueError(f"internal error: {where}/{name} is not produced from the source")
        if isinstance(spec, dict):
            _check(lazy[name], spec, f"{where}/{name}")
            continue
        leaf = lazy[name]
        if tuple(leaf.shape) != tuple(spec.shape):
            raise ValueError(f"internal error: {where}/{name} is {leaf.shape} from the source, the model expects {spec.shape}")
        if is_quant(spec) and leaf.is_fp8:
            for t in leaf.sources:
                kind = "block-scaled FP8" if t.block_scale() else t.dtype.name
                if t.dtype != np.dtype(ml_dtypes.float8_e4m3fn) or t.block_scale() is not None:
                    raise ValueError(f"tensor {t.name!r}: {kind} cannot be kept as the model's FP8 storage "
                                     "(float8_e4m3fn, one scale per tensor or expert): convert with --dtype bfloat16")


def to_float(leaf: Lazy, dtype: np.dtype) -> np.ndarray:
    """The array, filled piece by piece (cast to `dtype` on assignment, rounding to nearest even);
    ValueError for a finite value that overflows `dtype` (float16)."""
    out = np.empty(leaf.shape, dtype)
    for piece in leaf.pieces():
        values = piece.values()
        with np.errstate(over="ignore"):  # overflow is reported below, naming the tensor
            out[piece.index] = values
        if np.isinf(out[piece.index]).any() and np.isfinite(values).all():
            raise ValueError(f"tensor {piece.tensor.name!r} has values beyond the range of {dtype.name} "
                             f"(max |x| = {float(np.abs(values.astype(np.float32)).max()):.4g}): convert with "
                             "--dtype bfloat16 or float32")
    return out


def to_fp8(leaf: Lazy, scale_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn weights, float32 scale of `scale_shape`): FP8 sources kept bit for bit, float sources
    quantised with scale amax / 448 per row of the scale (per expert) or per tensor."""
    out = np.empty(leaf.shape, ml_dtypes.float8_e4m3fn)
    n = leaf.shape[0]
    per_row = scale_shape[0] != 1
    scales = np.zeros(scale_shape[0], np.float32)
    if leaf.is_fp8:
        seen: set[float] = set()
        for piece in leaf.pieces():
            w, s = piece.fp8()
            out[piece.index] = w
            scales[list(piece.out_rows(n)) if per_row else 0] = s
            seen.add(float(s))
        if not per_row and len(seen) > 1:
            raise ValueError(f"{leaf.name!r}: FP8 pieces with different scales cannot share one per-tensor scale")
        return out, scales.reshape(scale_shape)
    if per_row:
        for piece in leaf.pieces():
            rows = list(piece.out_rows(n))
            if piece.index[0] == slice(None) and len(piece.index) > 1:
                raise ValueError(f"internal error: {leaf.name!r} is read in column blocks; per-row scales need rows")
            v = np.asarray(piece.values(), np.float32).reshape(len(rows), -1)
            s = _scale_for(np.abs(v).max(axis=1))
            scales[rows] = s
            out[piece.index] = _quantize(v, s[:, None]).reshape(out[piece.index].shape)
        return out, scales.reshape(scale_shape)
    amax = max(float(np.abs(np.asarray(p.values(), np.float32)).max(initial=0.0)) for p in leaf.pieces())
    s = _scale_for(np.float32(amax))
    for piece in leaf.pieces():
        out[piece.index] = _quantize(np.asarray(piece.values(), np.float32), s)
    return out, np.full(scale_shape, s, np.float32)


def _scale_for(amax: np.ndarray) -> np.ndarray:
    amax = np.asarray(amax, np.float32)
    return np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)


def _quantize(v: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(v / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def materialize(lazy: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """The numpy arrays of one piece, in the storage format of `target` (a tree of ShapeDtypeStructs)."""
    out: dict[str, Any] = {}
    for name, spec in target.items():
        if isinstance(spec, dict):
            out[name] = materialize(lazy[name], spec)
        elif is_quant(spec):
            out[name] = QuantArray(*to_fp8(lazy[name], tuple(spec.scale.shape)))
        else:
            out[name] = to_float(lazy[name], np.dtype(spec.dtype))
    return out


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "bfloat16",
    text_only: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> str:
    """Convert the HF or Mistral checkpoint `src` into our Orbax checkpoint `dst` (see `mistral4_jax.weights.checkpoint`).

    Raises ValueError / FileNotFoundError / FileExistsError with a one-line message naming the file or tensor,
    and `Interrupted` (a KeyboardInterrupt saying what was kept) on SIGINT; an interrupted conversion
    continues with `resume=True`. Returns the path of the written checkpoint.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    dst = os.path.abspath(os.fspath(dst))
    with _Sigint(temporary_path(dst), dst) as sigint:
        return _convert(src, dst, dtype, text_only, overwrite, resume, progress, sigint)


def _convert(src: str | os.PathLike, dst: str, dtype: str, text_only: bool, overwrite: bool, resume: bool,
             progress: bool, sigint: _Sigint) -> str:
    source = open_source(src)
    cfg = source.config
    vision = source.vision_tensors()
    vcfg = vision_config(source) if vision and not text_only else None
    if vision and text_only:
        log.info("%s: skipping %d vision tensors (--text-only)", source.path, len(vision))
    lazy = plan(source)
    floats = fp8_float_weights(cfg, lazy) if is_quantized(dtype) else ()
    abstract = M.abstract_params(cfg, jnp.dtype(dtype), floats)
    targets = {p: ckpt.piece_abstract(cfg, jnp.dtype(dtype), p, abstract, vcfg) for p in ckpt.pieces(cfg, vcfg)}
    for piece, target in targets.items():
        if piece != ckpt.VISION:
            _check(lazy[piece], target, piece)
    if vcfg is not None:
        lazy[ckpt.VISION] = lambda target: read_vision(source, vcfg, target)

    identity = {"source_sha256": source.sha256, "dtype": dtype, "text_only": text_only,
                "converter_version": mistral4_jax.__version__, "format_version": ckpt.FORMAT_VERSION}
    sigint.writing()
    writer = CheckpointWriter(dst, identity, overwrite=overwrite, resume=resume)
    _write_pieces(writer, lazy, targets, progress, sigint)

    def manifest(tmp: str) -> dict[str, Any]:
        tensors, parameters = ckpt.verify(tmp, cfg, dtype, vcfg, floats)
        out = {
            "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "converter_version": mistral4_jax.__version__,
            "source": {"path": source.path, "format": source.format, "sha256": source.sha256,
                       "tensors": len(source.index.names()), "vision_tensors_skipped": 0 if vcfg else len(vision)},
            "dtype": dtype, "float_weights": list(floats), "text_only": text_only, "tensors": tensors,
            "parameters": parameters,
            "layers": {group: n for group, n, _ in M.layer_groups(cfg)},
            "files": sorted(source.files),
        }
        if vcfg is not None:
            v_tensors, v_params = ckpt.count(ckpt.vision_abstract(vcfg, dtype))
            out["vision"] = {"dtype": vision_dtype(dtype).name, "layers": vcfg.num_hidden_layers,
                             "tensors": v_tensors, "parameters": v_params, "source_tensors": len(vision)}
        return out

    json_files: dict[str, Any] = {ckpt.CONFIG: cfg.to_dict()}
    if vcfg is not None:
        json_files[ckpt.VISION_CONFIG] = vcfg.to_dict()
    writer.finalize()
    sigint.check()
    out = writer.finish(source.files, json_files, manifest)
    sigint.completed = True
    sigint.check()
    return out


def vision_config(source: Source) -> Any:
    """The `VisionConfig` of a source with vision tensors: from the HF `mistral3` config.json
    (`vision_config` + top-level fields) or from Mistral's params.json (`vision_encoder`). ValueError,
    suggesting --text-only, when the config has none or it does not fit."""
    if source.format == "hf":
        file = source.files.get("source_config.json", os.path.join(source.path, "config.json"))
        read = VisionConfig.from_hf_dict
    else:
        file = os.path.join(source.path, "params.json")
        read = VisionConfig.from_mistral_params
    with open(file) as f:
        raw = json.load(f)
    try:
        return read(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}; the checkpoint has {len(source.vision_tensors())} vision tensors "
                         "(pass --text-only to convert the text model alone)") from None


def read_vision(source: Source, vcfg: Any, target: dict[str, Any]) -> dict[str, Any]:
    """The vision piece as numpy arrays in the target dtypes (bfloat16/float32, never FP8): every vision tensor
    read (FP8 sources dequantised), checked and laid out by `vision.read_vision_params`."""
    dt = np.dtype(jax.tree_util.tree_leaves(target)[0].dtype)
    get = hf.HFReader(source.index, source.path, source.fp8_block, vision=True).get
    return read_vision_params(get, source.index.names(), vcfg, dt)


def _write_pieces(writer: CheckpointWriter, lazy: dict[str, Any], targets: dict[str, Any], progress: bool,
                  sigint: _Sigint) -> None:
    from tqdm import tqdm

    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    written = 0

    def after_save() -> None:
        nonlocal written
        written += 1
        if written == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    total_tensors = sum(len(jax.tree_util.tree_leaves(t)) for t in targets.values())
    done_tensors = 0
    with tqdm(total=sum(_nbytes(t) for t in targets.values()), unit="B", unit_scale=True, unit_divisor=1024,
              desc="converting", disable=not progress, dynamic_ncols=True) as bar:
        for piece, target in targets.items():
            if not writer.done(piece):
                with sigint.reading():
                    tree = lazy[piece](target) if callable(lazy[piece]) else materialize(lazy[piece], target)
                writer.save(piece, tree, after_save)
                del tree  # not held while the next piece is read
                log.debug("wrote %s", piece)
                sigint.check()
            done_tensors += len(jax.tree_util.tree_leaves(target))
            bar.set_postfix_str(f"{done_tensors}/{total_tensors} tensors", refresh=False)
            bar.update(_nbytes(target))
