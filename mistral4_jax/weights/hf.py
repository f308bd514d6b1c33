"""Reading HF-format Mistral 4 checkpoints (safetensors) into our parameter tree.

The one place that knows HF's tensor names and layouts. HF linear weights are [out, in]; ours are
[in, out] with heads split out (`q_b_proj` [Q, N, H], `o_proj` [N, V, D]); `kv_b_proj` is split into
`k_b_proj` [L, N, P] and `v_b_proj` [L, N, V]; the fused experts `gate_up_proj` [E, 2F, D] become
`experts_gate` / `experts_up` [E, D, F] and `down_proj` [E, D, F] becomes `experts_down` [E, F, D].

Accepted names: text-only `model.*` + `lm_head.weight`; multimodal on disk `language_model.model.*` +
`language_model.lm_head.weight`; multimodal in memory `model.language_model.*` + `lm_head.weight`; and
Mistral's native names (`tok_embeddings`, `layers.N.attention.wq_a`, `layers.N.experts.E.w1`, ...,
`qscale_weight` scales), renamed onto the HF names by `canonical_name` as HF's own mistral4 converter does.
Experts fused (`mlp.experts.gate_up_proj`) or per expert (`mlp.experts.N.{gate,up,down}_proj.weight`).
FP8 weights (F8_E4M3) are dequantised as `float(w) * weight_scale_inv` (per tensor, per expert [E,1,1],
or per block of the config's `quantization_config.weight_block_size`, 128x128 by default, ragged edge
blocks included).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import numpy as np

from ..config import Mistral4Config
from ..model import layer_groups as model_layer_groups
from .safetensors import TensorIndex
from .quant import FP8_DTYPE_NAMES

_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = (
    "vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
    "vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.",
)
_FLOAT_KINDS = ("float32", "bfloat16", "float16", "float64")

_NATIVE_GLOBALS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_NATIVE_MODULES = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.wq_a": "self_attn.q_a_proj", "attention.q_a_norm": "self_attn.q_a_layernorm",
    "attention.wq_b": "self_attn.q_b_proj", "attention.wq": "self_attn.q_proj",
    "attention.wkv_a_with_mqa": "self_attn.kv_a_proj_with_mqa", "attention.kv_a_norm": "self_attn.kv_a_layernorm",
    "attention.wkv_b": "self_attn.kv_b_proj", "attention.wo": "self_attn.o_proj", "gate": "mlp.gate",
    "shared_experts.w1": "mlp.shared_experts.gate_proj", "shared_experts.w2": "mlp.shared_experts.down_proj",
    "shared_experts.w3": "mlp.shared_experts.up_proj", "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
}
_NATIVE_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_NATIVE_SUFFIXES = {"weight": "weight", "qscale_weight": "weight_scale_inv", "qscale_act": "activation_scale"}
_NATIVE_RE = re.compile(r"^(?:layers\.(\d+)\.)?(.+)\.(weight|qscale_weight|qscale_act)$")
_NATIVE_EXPERT_RE = re.compile(r"^experts\.(\d+)\.(w[123])$")


def native_to_hf_name(name: str) -> str | None:
    """The HF name of a Mistral native tensor name (`layers.3.experts.7.w1.qscale_weight` ->
    `model.layers.3.mlp.experts.7.gate_proj.weight_scale_inv`), or None if `name` is not a native name.

    w1 is the gate, w2 the down and w3 the up projection; `qscale_weight` is the FP8 dequantisation
    multiplier (HF's `weight_scale_inv`), `qscale_act` the static activation scale (unused here).
    """
    m = _NATIVE_RE.match(name)
    if m is None:
        return None
    layer, module, suffix = m.groups()
    if layer is None:
        return f"{_NATIVE_GLOBALS[module]}.{_NATIVE_SUFFIXES[suffix]}" if module in _NATIVE_GLOBALS else None
    if module in _NATIVE_MODULES:
        hf_module = _NATIVE_MODULES[module]
    elif e := _NATIVE_EXPERT_RE.match(module):
        hf_module = f"mlp.experts.{e.group(1)}.{_NATIVE_EXPERT[e.group(2)]}"
    else:
        return None
    return f"model.layers.{layer}.{hf_module}.{_NATIVE_SUFFIXES[suffix]}"


def canonical_name(name: str) -> str:
    """Map multimodal prefixes and Mistral native names onto the text-only HF names
    (`model.layers.0...`, `lm_head.weight`); names it does not know are returned unchanged."""
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src) :]
    if not name.startswith(("model.", "lm_head.")):
        return native_to_hf_name(name) or name
    return name


def is_vision_name(name: str) -> bool:
    """Whether a checkpoint tensor belongs to the vision tower or the projector (HF or native names)."""
    return name.startswith(_VISION_PREFIXES)


class HFReader:
    """Canonical-name access to a checkpoint's tensors with shape/dtype checks and FP8 dequantisation.

    `get` returns float32 numpy arrays (exact for bf16/f16/FP8 inputs). Every name read, scales
    included, is recorded so that `unexpected()` can list what the model does not use.
    `vision=False` reads the text tensors (under their canonical names), `vision=True` the vision tower and
    projector tensors (under their stored names, for `weights.vision.read_vision_params`).
    """

    def __init__(self, index: TensorIndex, where: str, fp8_block: tuple[int, int] = (128, 128), vision: bool = False) -> None:
        self.index = index
        self.where = where
        self.fp8_block = fp8_block
        self._actual: dict[str, str] = {}
        for name in index.names():
            if is_vision_name(name) != vision:
                continue
            canon = name if vision else canonical_name(name)
            if canon in self._actual:
                raise ValueError(f"{where}: duplicate tensor {canon!r} (stored as {self._actual[canon]!r} and {name!r})")
            self._actual[canon] = name
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._actual

    def _raw(self, name: str) -> np.ndarray:
        if name not in self._actual:
            raise ValueError(f"{self.where}: missing tensor {name!r}")
        self.used.add(name)
        return self.index.get(self._actual[name])

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._actual:
            raise ValueError(f"{self.where}: missing tensor {name!r}")
        return self.index.shape(self._actual[name])

    def check(self, name: str, shape: tuple[int, ...]) -> np.dtype:
        """The stored dtype of tensor `name`, after checking that it has `shape` and a float or FP8 dtype."""
        actual_shape = self.shape(name)
        if tuple(actual_shape) != tuple(shape):
            raise ValueError(f"{self.where}: tensor {name!r} has shape {tuple(actual_shape)}, expected {tuple(shape)}")
        dtype = self.index.dtype(self._actual[name])
        if dtype.name not in FP8_DTYPE_NAMES + _FLOAT_KINDS:
            raise ValueError(f"{self.where}: tensor {name!r} has unsupported dtype {dtype.name}, expected a float dtype")
        return dtype

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32, checked to have `shape` and a float dtype (FP8 is dequantised)."""
        self.check(name, shape)
        w = self._raw(name)
        if w.dtype.name in FP8_DTYPE_NAMES:
            return dequantize_fp8(w, self._scale_of(name, w.shape), name, self.fp8_block)
        return np.asarray(w, dtype=np.float32)

    def _scale_of(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        for cand in (name + "_scale_inv", base + ".weight_scale_inv", name + "_scale", base + ".weight_scale",
                     base + ".qscale_weight"):
            if cand in self._actual:
                self.used.add(cand)
                for act in (base + ".activation_scale", base + ".input_scale", name + "_activation_scale"):
                    if act in self._actual:
                        self.used.add(act)
                return np.asarray(self.index.get(self._actual[cand]), dtype=np.float32)
        raise ValueError(f"{self.where}: FP8 tensor {name!r} has no scale ({name}_scale_inv or {base}.weight_scale_inv)")

    def unexpected(self) -> list[str]:
        return sorted(set(self._actual) - self.used)

    def stack(self, arrays: list[Any]) -> Any:
        """Stack per-expert arrays [E x (...)] into one [E, ...] array (a lazy reader stacks lazily)."""
        return np.stack(arrays)


def fp8_block(scale_shape: tuple[int, ...], w_shape: tuple[int, ...], block: tuple[int, int], name: str = "") -> tuple[int, int] | None:
    """None if an FP8 scale broadcasts over its weight (per tensor [] / [1], per leading index [E, 1, 1]);
    `block` if it is a block scale [..., ceil(out/b0), ceil(in/b1)]; ValueError if it fits neither."""
    if math.prod(scale_shape) == 1:
        return None
    if len(scale_shape) == len(w_shape) and all(s in (1, d) for s, d in zip(scale_shape[:-2], w_shape[:-2])):
        if tuple(scale_shape[-2:]) == (1, 1):
            return None
        (rows, cols), (b0, b1) = w_shape[-2:], block
        if tuple(scale_shape[-2:]) == (math.ceil(rows / b0), math.ceil(cols / b1)):
            return block
    raise ValueError(f"FP8 tensor {name!r}: scale of shape {tuple(scale_shape)} does not fit weight shape "
                     f"{tuple(w_shape)} (per tensor, per expert, or {block[0]}x{block[1]} blocks)")


def dequantize_fp8(w: np.ndarray, scale: np.ndarray, name: str = "", block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """float32(w) * scale, scale per tensor ([] or [1]), per leading index ([E, 1, 1]) or per block.

    Block scales have shape [..., ceil(out/b0), ceil(in/b1)] for the checkpoint's `weight_block_size`
    (b0, b1) (128 x 128 for DeepSeek-style checkpoints); ragged edge blocks are sliced off.
    """
    wf = w.astype(np.float32)
    b = fp8_block(scale.shape, w.shape, block, name)
    if b is None:
        return wf * (scale.reshape(()) if scale.size == 1 else scale)
    rows, cols = w.shape[-2:]
    full = np.repeat(np.repeat(scale, b[0], axis=-2), b[1], axis=-1)[..., :rows, :cols]
    return wf * full


def fp8_block_size(config: dict[str, Any]) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of an HF config dict (top level or text_config), default 128x128."""
    for d in (config, config.get("text_config") or {}):
        size = (d.get("quantization_config") or {}).get("weight_block_size")
        if size:
            if len(size) != 2 or not all(isinstance(x, int) and x > 0 for x in size):
                raise ValueError(f"config field 'quantization_config.weight_block_size' must be two positive integers, got {size!r}")
            return int(size[0]), int(size[1])
    return (128, 128)


def _lin(r: HFReader, name: str, out: int, inp: int) -> np.ndarray:
    """HF linear weight [out, in] -> ours [in, out]."""
    return r.get(name + ".weight", (out, inp)).T


def _experts(r: HFReader, p: str, cfg: Mistral4Config) -> dict[str, np.ndarray]:
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    if r.has(p + "mlp.experts.gate_up_proj"):
        gate_up = r.get(p + "mlp.experts.gate_up_proj", (e, 2 * f, d))
        down = r.get(p + "mlp.experts.down_proj", (e, d, f))
        return {
            "experts_gate": gate_up[:, :f].transpose(0, 2, 1),
            "experts_up": gate_up[:, f:].transpose(0, 2, 1),
            "experts_down": down.transpose(0, 2, 1),
        }
    q = [f"{p}mlp.experts.{i}." for i in range(e)]
    return {
        "experts_gate": r.stack([_lin(r, x + "gate_proj", f, d) for x in q]),
        "experts_up": r.stack([_lin(r, x + "up_proj", f, d) for x in q]),
        "experts_down": r.stack([_lin(r, x + "down_proj", d, f) for x in q]),
    }


def read_layer(r: HFReader, i: int, cfg: Mistral4Config) -> dict[str, Any]:
    """Layer i's parameters (float32 numpy, our layout) as the nested dict of one scanned layer."""
    p = f"model.layers.{i}."
    d, n, nope, rope, v, lat = (cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    h = nope + rope
    a = p + "self_attn."
    attn: dict[str, Any] = {}
    if cfg.q_lora_rank:
        q = cfg.q_lora_rank
        attn["q_a_proj"] = _lin(r, a + "q_a_proj", q, d)
        attn["q_a_norm"] = {"scale": r.get(a + "q_a_layernorm.weight", (q,))}
        attn["q_b_proj"] = _lin(r, a + "q_b_proj", n * h, q).reshape(q, n, h)
    else:
        attn["q_proj"] = _lin(r, a + "q_proj", n * h, d).reshape(d, n, h)
    attn["kv_a_proj"] = _lin(r, a + "kv_a_proj_with_mqa", lat + rope, d)
    attn["kv_a_norm"] = {"scale": r.get(a + "kv_a_layernorm.weight", (lat,))}
    kv_b = _lin(r, a + "kv_b_proj", n * (nope + v), lat).reshape(lat, n, nope + v)
    attn["k_b_proj"], attn["v_b_proj"] = kv_b[..., :nope], kv_b[..., nope:]
    attn["o_proj"] = _lin(r, a + "o_proj", d, n * v).reshape(n, v, d)
    layer: dict[str, Any] = {
        "attn": attn,
        "input_norm": {"scale": r.get(p + "input_layernorm.weight", (d,))},
        "post_attn_norm": {"scale": r.get(p + "post_attention_layernorm.weight", (d,))},
    }
    if i < cfg.first_k_dense_replace:
        m, w = p + "mlp.", cfg.intermediate_size
        layer["mlp"] = {"gate_proj": _lin(r, m + "gate_proj", w, d), "up_proj": _lin(r, m + "up_proj", w, d),
                        "down_proj": _lin(r, m + "down_proj", d, w)}
    else:
        s, w = p + "mlp.shared_experts.", cfg.shared_intermediate_size
        layer["moe"] = {
            "router": _lin(r, p + "mlp.gate", cfg.n_routed_experts, d),
            **_experts(r, p, cfg),
            "shared_expert": {"gate_proj": _lin(r, s + "gate_proj", w, d), "up_proj": _lin(r, s + "up_proj", w, d),
                              "down_proj": _lin(r, s + "down_proj", d, w)},
        }
    return layer


def read_globals(r: HFReader, cfg: Mistral4Config) -> dict[str, Any]:
    """Embedding, final norm and (untied) lm_head in our layout."""
    out: dict[str, Any] = {
        "embed": r.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
        "final_norm": {"scale": r.get("model.norm.weight", (cfg.hidden_size,))},
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = r.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))  # [X, D], as HF stores it
    elif r.has("lm_head.weight"):
        r.used.add("lm_head.weight")
    return out


def layer_groups(cfg: Mistral4Config) -> list[tuple[str, range]]:
    """Our stacked layer groups and the HF layer indices each holds."""
    out, start = [], 0
    for name, n, _ in model_layer_groups(cfg):
        out.append((name, range(start, start + n)))
        start += n
    return out


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def read_params(directory: str, cfg: Mistral4Config, dtype: Any = np.float32) -> dict[str, Any]:
    """The whole parameter tree (numpy, `dtype`) of an HF checkpoint directory, stacked per layer group.

    Raises ValueError naming the tensor for missing, unexpected, mis-shaped or wrongly typed tensors.
    """
    with open(os.path.join(directory, "config.json")) as f:
        block = fp8_block_size(json.load(f))
    r = HFReader(TensorIndex.open(directory), directory, block)
    params = read_globals(r, cfg)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), params)
    for group, idx in layer_groups(cfg):
        stacked: Any = None
        for j, i in enumerate(idx):
            layer = read_layer(r, i, cfg)
            if stacked is None:
                stacked = jax.tree_util.tree_map(lambda x: np.empty((len(idx), *x.shape), dtype), layer)
            jax.tree_util.tree_map(lambda dst, src: dst.__setitem__(j, src), stacked, layer)
        params[group] = stacked
    check_unexpected(r, cfg)
    return params


def check_unexpected(r: HFReader, cfg: Mistral4Config) -> None:
    """Raise ValueError naming the first tensor of the checkpoint that nothing read (vision tensors aside)."""
    extra = r.unexpected()
    if extra:
        layers = [int(m.group(1)) for n in extra if (m := _LAYER_RE.match(n))]
        hint = f" (the config has {cfg.num_hidden_layers} layers)" if layers and max(layers) >= cfg.num_hidden_layers else ""
        raise ValueError(f"{r.where}: unexpected tensor {extra[0]!r}{hint}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
