"""`load(path)`: a `Mistral4` from a converted checkpoint or an HF checkpoint directory, with its vision tower
and tokenizer when the directory has them."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint
from .. import model as M
from ..api import Mistral4, default_compute_dtype, resolve_dtype
from ..serve.chat import Tokenizer
from ..config import Mistral4Config
from ..model.vision import vision_dtype
from ..model.vision_config import VisionConfig
from ..model import param_shardings
from ..sharding import DEFAULT_RULES, ShardingRules
from .hf import HFReader, fp8_block_size, is_vision_name, read_params
from .safetensors import TensorIndex
from .vision import read_vision_params

log = logging.getLogger(__name__)


def load(path: str | os.PathLike, dtype: Any = "float32", compute_dtype: Any = None, mesh: Any = None,
         shardings: Any = None, layer_loop: str = "auto", text_only: bool = False, moe_backend: str = "auto",
         rules: ShardingRules | None = None) -> Mistral4:
    """Load a model from a converted checkpoint (`mistral4-jax convert`, has a manifest.json) or from an HF
    checkpoint directory (config.json + safetensors).

    dtype: storage dtype of the parameters ("float32", "bfloat16", "float16", or "float8_e4m3fn" for the
    FP8 weights of a checkpoint converted with `--dtype float8_e4m3fn`); a converted checkpoint is cast
    (FP8 dequantised) while it is read. compute_dtype defaults to float32 on CPU and to `dtype` elsewhere
    (bfloat16 for FP8 weights).
    mesh: the device mesh the model runs on (`sharding.make_mesh`). shardings: where each parameter is
    placed while loading, as `checkpoint.restore_params` accepts (one `Sharding`, a tree of them, or a
    callable (logical axes, ShapeDtypeStruct) -> Sharding); default: the layout of `rules` on `mesh` if
    given, else the default device. A converted checkpoint is restored straight into them, and the model
    keeps them (`Mistral4` does not re-shard what it is given).
    layer_loop, moe_backend, rules (`sharding.ShardingRules`, None = `sharding.DEFAULT_RULES`): see `Mistral4`.
    The tokenizer (tekken.json or tokenizer.json in `path`) is attached as `model.tokenizer` when present.
    Vision: an HF `mistral3` checkpoint's vision tower and projector (`vision_config` in config.json, tensors
    `vision_tower.*` / `multi_modal_projector.*`), or those a converted checkpoint holds, are loaded as
    `model.vision_config` / `model.vision_params`, stored in `dtype` (bfloat16 when `dtype` is FP8) and
    replicated over the mesh; `text_only=True` skips them (`model.vision_config` is then None).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    jdtype = resolve_dtype(dtype)
    converted = checkpoint.is_checkpoint(path)
    if not converted and M.is_fp8(jdtype):
        raise ValueError(f"{path}: FP8 weights load from a converted checkpoint: "
                         f"run `mistral4-jax convert {path} DST --dtype float8_e4m3fn` first")
    config = checkpoint.read_config(path) if converted else Mistral4Config.from_json(os.path.join(path, "config.json"))
    floats = checkpoint.read_manifest(path).get("float_weights", []) if converted else []
    if shardings is None and mesh is not None:
        shardings = param_shardings(config, mesh, jdtype, DEFAULT_RULES if rules is None else rules,
                                    float_weights=floats)
    elif shardings is not None:
        shardings = checkpoint.resolve_shardings(shardings, config, jdtype, M.abstract_params(config, jdtype, floats))
    if converted:
        config, params = checkpoint.restore_params(path, jdtype, shardings)
    else:
        params = jax.device_put(read_params(path, config, np.dtype(jdtype)), shardings)
    log.info("loaded %s (%d layers) from %s", type(config).__name__, config.num_hidden_layers, path)
    vcfg, vparams = (None, None) if text_only else _load_vision(path, converted, vision_dtype(jdtype))
    if compute_dtype is None and M.is_fp8(jdtype):
        compute_dtype = default_compute_dtype(jnp.bfloat16)
    model = Mistral4(config, params, dtype=jdtype, compute_dtype=compute_dtype, mesh=mesh, layer_loop=layer_loop,
                     vision_config=vcfg, vision_params=vparams, moe_backend=moe_backend, rules=rules, shardings=shardings)
    model.tokenizer = _find_tokenizer(path)
    return model


def _load_vision(path: str, converted: bool, dtype: Any) -> tuple[Any, Any]:
    """(VisionConfig, numpy/jax vision params in `dtype`) of a checkpoint directory, or (None, None) if it has
    no vision tower. ValueError for a vision config or vision tensors that do not fit."""
    if converted:
        vcfg = checkpoint.read_vision_config(path)
        if vcfg is None:
            return None, None
        return vcfg, checkpoint.restore_vision(path, dtype)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") != "mistral3" or not isinstance(raw.get("vision_config"), dict):
        return None, None
    try:
        vcfg = VisionConfig.from_hf_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}/config.json: {e} (load with text_only=True to skip the vision tower)") from None
    index = TensorIndex.open(path)
    if not any(is_vision_name(n) for n in index.names()):
        log.warning("%s: the config has a vision_config but the checkpoint has no vision tensors: loading text only", path)
        return None, None
    vparams = read_vision_params(HFReader(index, path, fp8_block_size(raw), vision=True).get, index.names(), vcfg,
                                        np.dtype(dtype))
    log.info("loaded the vision tower (%d layers) and projector from %s", vcfg.num_hidden_layers, path)
    return vcfg, vparams


def _find_tokenizer(path: str) -> Any:
    """The tokenizer stored in `path`, or None (with a warning if one is there but cannot be read)."""
    if not any(os.path.exists(os.path.join(path, n)) for n in ("tekken.json", "tokenizer.json")):
        return None
    try:
        return Tokenizer.from_dir(path)
    except (ImportError, ValueError, FileNotFoundError) as e:
        log.warning("%s: tokenizer not loaded (%s)", path, e)
        return None
