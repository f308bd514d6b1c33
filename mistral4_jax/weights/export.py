"""Writing our parameter tree back as an HF checkpoint (safetensors + config.json + tokenizer files): the inverse
of `hf.read_params` (and of `vision.read_vision_params` for a multimodal checkpoint).

Layouts (ours -> HF, HF linear weights [out, in]; D hidden, N heads, H = P + R qk head dim, V v head dim, L kv
lora rank, Q q lora rank, E experts, F expert width, X vocabulary):
  embed [X, D] -> model.embed_tokens.weight [X, D];  lm_head [X, D] -> lm_head.weight (absent when tied)
  q_a_proj [D, Q] -> q_a_proj.weight [Q, D];  q_b_proj [Q, N, H] -> q_b_proj.weight [N*H, Q]
  q_proj [D, N, H] -> q_proj.weight [N*H, D];  kv_a_proj [D, L+R] -> kv_a_proj_with_mqa.weight [L+R, D]
  k_b_proj [L, N, P] + v_b_proj [L, N, V] -> kv_b_proj.weight [N*(P+V), L];  o_proj [N, V, D] -> o_proj.weight [D, N*V]
  experts_gate / experts_up [E, D, F] -> mlp.experts.gate_up_proj [E, 2F, D] (gate rows first)
  experts_down [E, F, D] -> mlp.experts.down_proj [E, D, F];  router [D, E] -> mlp.gate.weight [E, D]
  norms {scale [n]} -> *.weight [n]
as transformers 5's `Mistral4ForCausalLM.state_dict()` names them (fused experts, as its `save_pretrained` writes).
`QuantArray` (FP8) and `LoraWeight` leaves are written as the float weight they stand for; export writes float only.

Multimodal: the inverse of `read_vision_params` for HF names is plain transposes and reshapes (`vision_tensors`),
so `write_hf(..., vision=(vision_params, vision_config, extra))` writes a `Mistral3ForConditionalGeneration`
checkpoint (text under `language_model.`, the tower under `vision_tower.`, the projector under
`multi_modal_projector.`, as transformers' `save_pretrained` writes it). Without `vision` the text model alone is
written as a `Mistral4ForCausalLM` checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from ..config import Mistral4Config
from ..model.params import abstract_params
from ..model.vision import abstract_params as vision_abstract_params
from ..model.vision_config import VisionConfig
from ..sharding import path_name
from .hf import layer_groups
from .lora import LoraWeight
from .quant import QuantArray, dequantize

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tekken.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_SHARD_BYTES = 5 * 10**9
_DTYPES = ("float32", "bfloat16", "float16")


def _is_weight(x: Any) -> bool:
    return isinstance(x, (QuantArray, LoraWeight))


def _f32(x: Any) -> np.ndarray:
    """A leaf (numpy / jax array, `QuantArray`, `LoraWeight`) as a float32 numpy array."""
    if _is_weight(x):
        x = dequantize(x, jnp.float32)
    return np.asarray(jax.device_get(x), dtype=np.float32)


def _layers(group: Any, n: int) -> Iterator[Any]:
    """The per-layer trees of a layer group: stacked [n, ...] (`read_params`) or a list (`unstack_layers`)."""
    for j in range(n):
        yield group[j] if isinstance(group, list) else jax.tree_util.tree_map(lambda x: x[j], group)  # QuantArray / LoraWeight leaves too


def _check_shapes(params: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """ValueError naming the first leaf of `params` that is missing from, not in, or shaped unlike `want` (a tree of
    `ShapeDtypeStruct`s); layer groups given as lists of per-layer trees count as stacked."""
    def shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_weight)[0]
        return {prefix + path_name(k): tuple(x.shape) for k, x in flat}

    have: dict[str, tuple[int, ...]] = {}
    for name, value in params.items():
        if isinstance(value, list) and value:
            have.update({k: (len(value), *s) for k, s in shapes(value[0], name + "/").items()})
        else:
            have.update(shapes(value, name + "/") if isinstance(value, dict) else {name: tuple(value.shape)})
    need = shapes(want, "")
    for k in sorted(set(need) | set(have)):
        if k not in have:
            raise ValueError(f"{what}: missing {k!r} (shape {need[k]} for this config)")
        if k not in need:
            raise ValueError(f"{what}: unexpected {k!r}: this config has no such parameter")
        if have[k] != need[k]:
            raise ValueError(f"{what}: {k!r} has shape {have[k]}, expected {need[k]} for this config")


def check_params(params: dict[str, Any], cfg: Mistral4Config) -> None:
    """ValueError naming the first text parameter that is missing, unexpected or shaped unlike `cfg`'s tree."""
    _check_shapes(params, abstract_params(cfg), "params")


def layer_tensors(layer: dict[str, Any], i: int, cfg: Mistral4Config) -> dict[str, np.ndarray]:
    """HF tensors (float32, [out, in]) of one layer's tree (our layout, no [layers] axis) as HF layer `i`."""
    c, p = cfg, f"model.layers.{i}."
    n, nope, v, lat = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    a = jax.tree_util.tree_map(_f32, layer["attn"], is_leaf=_is_weight)
    s = p + "self_attn."
    out = {p + "input_layernorm.weight": _f32(layer["input_norm"]["scale"]),
           p + "post_attention_layernorm.weight": _f32(layer["post_attn_norm"]["scale"])}
    if c.q_lora_rank:
        out[s + "q_a_proj.weight"] = a["q_a_proj"].T
        out[s + "q_a_layernorm.weight"] = a["q_a_norm"]["scale"]
        out[s + "q_b_proj.weight"] = a["q_b_proj"].reshape(c.q_lora_rank, -1).T
    else:
        out[s + "q_proj.weight"] = a["q_proj"].reshape(c.hidden_size, -1).T
    out[s + "kv_a_proj_with_mqa.weight"] = a["kv_a_proj"].T
    out[s + "kv_a_layernorm.weight"] = a["kv_a_norm"]["scale"]
    kv_b = np.concatenate([a["k_b_proj"], a["v_b_proj"]], axis=-1)  # [L, N, P + V]
    out[s + "kv_b_proj.weight"] = kv_b.reshape(lat, n * (nope + v)).T
    out[s + "o_proj.weight"] = a["o_proj"].reshape(n * v, c.hidden_size).T

    def mlp(tree: dict[str, Any], prefix: str) -> None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{prefix}{name}.weight"] = _f32(tree[name]).T

    if "mlp" in layer:
        mlp(layer["mlp"], p + "mlp.")
    else:
        m = layer["moe"]
        out[p + "mlp.gate.weight"] = _f32(m["router"]).T
        gate, up, down = (_f32(m[k]) for k in ("experts_gate", "experts_up", "experts_down"))
        out[p + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=-1).transpose(0, 2, 1)  # [E, 2F, D]
        out[p + "mlp.experts.down_proj"] = down.transpose(0, 2, 1)  # [E, D, F]
        mlp(m["shared_expert"], p + "mlp.shared_experts.")
    return out


def _iter_tensors(params: dict[str, Any], cfg: Mistral4Config) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) of every text tensor, layer by layer (one layer's float copy at a time)."""
    yield "model.embed_tokens.weight", _f32(params["embed"])
    for group, idx in layer_groups(cfg):
        for i, layer in zip(idx, _layers(params[group], len(idx))):
            yield from layer_tensors(layer, i, cfg).items()
    yield "model.norm.weight", _f32(params["final_norm"]["scale"])
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _f32(params["lm_head"])


def hf_tensors(params: dict[str, Any], cfg: Mistral4Config) -> dict[str, np.ndarray]:
    """Our text parameter tree -> {HF `Mistral4ForCausalLM` name: float32 numpy array in HF's layout}.

    params: as `hf.read_params` returns it (layer groups stacked [layers, ...]) or with the groups as lists of
    per-layer trees (`model.unstack_layers`); numpy or jax arrays, `QuantArray`s (dequantised) and `LoraWeight`s
    (merged). ValueError names a parameter that is missing, unexpected or shaped unlike `cfg`'s tree.
    """
    check_params(params, cfg)
    return dict(_iter_tensors(params, cfg))


def vision_tensors(vparams: dict[str, Any], vcfg: VisionConfig) -> dict[str, np.ndarray]:
    """The vision tree (`read_vision_params`' layout, layers stacked) -> HF `vision_tower.*` /
    `multi_modal_projector.*` tensors (float32), the inverse of `vision.read_vision_params` for HF names."""
    c = vcfg
    v = jax.tree_util.tree_map(_f32, vparams)
    d = c.hidden_size
    out = {"vision_tower.patch_conv.weight": v["patch_embed"]["patch_conv"].T.reshape(d, c.num_channels, c.patch_size, c.patch_size),
           "vision_tower.ln_pre.weight": v["patch_embed"]["ln_pre"]["scale"]}
    layers = v["layers"]
    for i in range(c.num_hidden_layers):
        p = f"vision_tower.transformer.layers.{i}."
        att, ff = layers["attention"], layers["feed_forward"]
        for x in ("q_proj", "k_proj", "v_proj"):
            out[f"{p}attention.{x}.weight"] = att[x][i].reshape(d, -1).T
        out[p + "attention.o_proj.weight"] = att["o_proj"][i].reshape(-1, d).T
        for x in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}feed_forward.{x}.weight"] = ff[x][i].T
        out[p + "attention_norm.weight"] = layers["attention_norm"]["scale"][i]
        out[p + "ffn_norm.weight"] = layers["ffn_norm"]["scale"][i]
    pr, m = v["projector"], "multi_modal_projector."
    out[m + "norm.weight"] = pr["norm"]["scale"]
    out[m + "patch_merger.merging_layer.weight"] = pr["merging_layer"].transpose(2, 1, 0).reshape(d, -1)  # [W, D, D] -> [D, D*W]
    for x in ("linear_1", "linear_2"):
        out[f"{m}{x}.weight"] = pr[x].T
        if c.multimodal_projector_bias:
            out[f"{m}{x}.bias"] = pr[x + "_bias"]
    return out


def mistral3_config(cfg: Mistral4Config, vcfg: VisionConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF `mistral3` config dict of a multimodal checkpoint: `cfg` as text_config, `vcfg` as vision_config and
    top-level fields, then `extra` (other top-level fields, e.g. a source config's; it may not contradict `vcfg`)."""
    c = vcfg
    d = {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"], "text_config": cfg.to_hf_dict(),
         "vision_config": {"model_type": "pixtral", "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                           "num_attention_heads": c.num_attention_heads, "head_dim": c.head_dim,
                           "intermediate_size": c.intermediate_size, "patch_size": c.patch_size, "image_size": c.image_size,
                           "num_channels": c.num_channels, "hidden_act": c.hidden_act,
                           "rope_parameters": {"rope_type": "axial", "rope_theta": c.rope_theta}},
         "spatial_merge_size": c.spatial_merge_size, "projector_hidden_act": c.projector_hidden_act,
         "multimodal_projector_bias": c.multimodal_projector_bias, "vision_feature_layer": c.vision_feature_layer,
         "image_token_index": c.image_token_index, "tie_word_embeddings": cfg.tie_word_embeddings}
    d.update(extra or {})
    back = VisionConfig.from_hf_dict(d)  # the HF config has no break/end tokens nor the tower's norm eps
    keep = {"image_break_token_index": c.image_break_token_index, "image_end_token_index": c.image_end_token_index,
            "norm_eps": c.norm_eps}
    if dataclasses.replace(back, **keep) != c:
        diff = [k for k in c.__dict__ if getattr(back, k) != getattr(c, k) and k not in keep]
        raise ValueError(f"the mistral3 config cannot express this vision config: {diff[0]!r} would read back as "
                         f"{getattr(back, diff[0])!r}, not {getattr(c, diff[0])!r}")
    return d


def write_hf(dst: str | os.PathLike, params: dict[str, Any], cfg: Mistral4Config, *, dtype: str = "bfloat16",
             tokenizer_dir: str | os.PathLike | None = None, vision: tuple[Any, VisionConfig, dict[str, Any] | None] | None = None,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Write an HF checkpoint directory `dst` that transformers' `from_pretrained` loads; returns its path.

    Text only: config.json (`cfg.to_hf_dict()`, model_type "mistral4", architectures ["Mistral4ForCausalLM"]) and
    the tensors of `hf_tensors`. `vision=(vision_params, vision_config, hf_config_extra)`: a
    `Mistral3ForConditionalGeneration` checkpoint instead (`mistral3_config`; text tensors under
    `language_model.`, vision under `vision_tower.` / `multi_modal_projector.`, as its `save_pretrained` writes).
    Tensors in `dtype` ("float32", "bfloat16" or "float16"), in `model.safetensors`, or in shards of at most
    `max_shard_bytes` (a larger tensor alone) with `model.safetensors.index.json`; metadata {"format": "pt"}.
    Converted to float one layer at a time, so host memory holds about one shard beyond `params`.
    Tokenizer files (`TOKENIZER_FILES`, whichever exist) are copied from `tokenizer_dir`.

    Written into `.<name>.exporting` beside dst and renamed at the end: a failed export leaves no dst (and a
    leftover from a killed export is replaced). An existing dst other than an empty directory is refused.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise ValueError(f"{dst} already exists and is not an empty directory; export writes a new checkpoint")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        np_dtype = None
    if str(np_dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise ValueError(f"tokenizer_dir {os.fspath(tokenizer_dir)} is not a directory")
    check_params(params, cfg)
    if vision is None:
        config = {**cfg.to_hf_dict(), "architectures": ["Mistral4ForCausalLM"], "dtype": str(np_dtype)}
        tensors: Iterable[tuple[str, np.ndarray]] = _iter_tensors(params, cfg)
    else:
        vparams, vcfg, extra = vision
        _check_shapes(vparams, vision_abstract_params(vcfg), "vision params")
        config = {**mistral3_config(cfg, vcfg, extra), "dtype": str(np_dtype)}
        text = (("language_model." + k, x) for k, x in _iter_tensors(params, cfg))
        tensors = itertools.chain(vision_tensors(vparams, vcfg).items(), text)

    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.exporting")
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        _write_shards(tmp, tensors, np_dtype, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        if tokenizer_dir is not None:
            _copy_tokenizer(os.fspath(tokenizer_dir), tmp)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty, checked above
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", dst)
    return dst


def _write_shards(directory: str, tensors: Iterable[tuple[str, np.ndarray]], dtype: np.dtype, max_bytes: int) -> None:
    """Write `tensors` (cast to `dtype`) as `model.safetensors`, or as shards `model-0000k-of-0000n.safetensors` of at
    most `max_bytes` each plus `model.safetensors.index.json` (HF's sharded layout)."""
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        save_file(pending, os.path.join(directory, f"shard-{len(shards) + 1}.tmp"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending.clear()

    for name, x in tensors:
        x = np.ascontiguousarray(x, dtype)
        if pending and size + x.nbytes > max_bytes:
            flush()
            size = 0
        pending[name] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    if len(shards) == 1:
        os.rename(os.path.join(directory, "shard-1.tmp"), os.path.join(directory, "model.safetensors"))
        return
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(directory, f"shard-{k}.tmp"), os.path.join(directory, file))
        weight_map.update(dict.fromkeys(names, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")


def _copy_tokenizer(src: str, dst: str) -> None:
    """Copy the `TOKENIZER_FILES` that `src` holds into `dst` (a warning if it holds none)."""
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in copied:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    if not copied:
        log.warning("%s has none of %s: the export has no tokenizer", src, ", ".join(TOKENIZER_FILES))
