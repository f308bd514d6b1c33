"""Reading HF-format Mistral 4 checkpoints (safetensors) into our parameter tree.

The one place that knows HF's tensor names and layouts. HF linear weights are [out, in]; ours are
[in, out] with heads split out (`q_b_proj` [Q, N, H], `o_proj` [N, V, D]); `kv_b_proj` is split into
`k_b_proj` [L, N, P] and `v_b_proj` [L, N, V]; the fused experts `gate_up_proj` [E, 2F, D] become
`experts_gate` / `experts_up` [E, D, F] and `down_proj` [E, D, F] becomes `experts_down` [E, F, D].

Accepted names: text-only `model.*` + `lm_head.weight`; multimodal on disk `language_model.model.*` +
`language_model.lm_head.weight`; multimodal in memory `model.language_model.*` + `lm_head.weight`.
Experts fused (`mlp.experts.gate_up_proj`) or per expert (`mlp.experts.N.{gate,up,down}_proj.weight`).
FP8 weights (F8_E4M3) are dequantised as `float(w) * weight_scale_inv` (per tensor, per expert [E,1,1],
or per 128x128 block with ragged edges).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .config import Mistral4Config
from .safetensors_io import TensorIndex

_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")
_FLOAT_KINDS = ("float32", "bfloat16", "float16", "float64")
_FP8 = ("float8_e4m3fn", "float8_e5m2")


def canonical_name(name: str) -> str:
    """Map the multimodal prefixes onto the text-only names (`model.layers.0...`, `lm_head.weight`)."""
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src) :]
    return name


def is_vision_name(name: str) -> bool:
    return name.startswith(_VISION_PREFIXES)


class HFReader:
    """Canonical-name access to a checkpoint's tensors with shape/dtype checks and FP8 dequantisation.

    `get` returns float32 numpy arrays (exact for bf16/f16/FP8 inputs). Every name read, scales
    included, is recorded so that `unexpected()` can list what the model does not use.
    """

    def __init__(self, index: TensorIndex, where: str) -> None:
        self.index = index
        self.where = where
        self._actual: dict[str, str] = {}
        for name in index.names():
            if is_vision_name(name):
                continue
            canon = canonical_name(name)
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

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32, checked to have `shape` and a float dtype (FP8 is dequantised)."""
        actual_shape = self.shape(name)
        if tuple(actual_shape) != tuple(shape):
            raise ValueError(f"{self.where}: tensor {name!r} has shape {tuple(actual_shape)}, expected {tuple(shape)}")
        w = self._raw(name)
        kind = w.dtype.name
        if kind in _FP8:
            return dequantize_fp8(w, self._scale_of(name, w.shape), name)
        if kind not in _FLOAT_KINDS:
            raise ValueError(f"{self.where}: tensor {name!r} has unsupported dtype {kind}, expected a float dtype")
        return np.asarray(w, dtype=np.float32)

    def _scale_of(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        for cand in (name + "_scale_inv", base + ".weight_scale_inv", name + "_scale", base + ".weight_scale"):
            if cand in self._actual:
                self.used.add(cand)
                for act in (base + ".activation_scale", base + ".input_scale", name + "_activation_scale"):
                    if act in self._actual:
                        self.used.add(act)
                return np.asarray(self.index.get(self._actual[cand]), dtype=np.float32)
        raise ValueError(f"{self.where}: FP8 tensor {name!r} has no scale ({name}_scale_inv or {base}.weight_scale_inv)")

    def unexpected(self) -> list[str]:
        return sorted(set(self._actual) - self.used)


def dequantize_fp8(w: np.ndarray, scale: np.ndarray, name: str = "") -> np.ndarray:
    """float32(w) * scale, scale per tensor ([] or [1]), per leading index ([E, 1, 1]) or per block.

    Block scales have shape [..., ceil(out/b0), ceil(in/b1)]; the block size is inferred from the
    shapes (128 x 128 for DeepSeek-style checkpoints) and ragged edges are sliced off.
    """
    wf = w.astype(np.float32)
    if scale.size == 1:
        return wf * scale.reshape(())
    if scale.ndim == w.ndim and all(s == 1 or s == d for s, d in zip(scale.shape[:-2], w.shape[:-2])):
        if scale.shape[-2:] == (1, 1):
            return wf * scale
        rows, cols = w.shape[-2:]
        srows, scols = scale.shape[-2:]
        b0, b1 = -(-rows // srows), -(-cols // scols)
        if math.ceil(rows / b0) == srows and math.ceil(cols / b1) == scols:
            full = np.repeat(np.repeat(scale, b0, axis=-2), b1, axis=-1)[..., :rows, :cols]
            return wf * full
    raise ValueError(f"FP8 tensor {name!r}: scale of shape {scale.shape} does not fit weight shape {w.shape}")


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
    gate, up, down = np.empty((e, d, f), np.float32), np.empty((e, d, f), np.float32), np.empty((e, f, d), np.float32)
    for i in range(e):
        q = f"{p}mlp.experts.{i}."
        gate[i] = _lin(r, q + "gate_proj", f, d)
        up[i] = _lin(r, q + "up_proj", f, d)
        down[i] = _lin(r, q + "down_proj", d, f)
    return {"experts_gate": gate, "experts_up": up, "experts_down": down}


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
        out["lm_head"] = _lin(r, "lm_head", cfg.vocab_size, cfg.hidden_size)
    elif r.has("lm_head.weight"):
        r.used.add("lm_head.weight")
    return out


def layer_groups(cfg: Mistral4Config) -> list[tuple[str, range]]:
    """Our stacked layer groups and the HF layer indices each holds."""
    from .model import layer_groups as groups

    out, start = [], 0
    for name, n, _ in groups(cfg):
        out.append((name, range(start, start + n)))
        start += n
    return out


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def read_params(directory: str, cfg: Mistral4Config, dtype: Any = np.float32) -> dict[str, Any]:
    """The whole parameter tree (numpy, `dtype`) of an HF checkpoint directory, stacked per layer group.

    Raises ValueError naming the tensor for missing, unexpected, mis-shaped or wrongly typed tensors.
    """
    import jax

    r = HFReader(TensorIndex.open(directory), directory)
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
    extra = r.unexpected()
    if extra:
        layers = [int(m.group(1)) for n in extra if (m := _LAYER_RE.match(n))]
        hint = f" (the config has {cfg.num_hidden_layers} layers)" if layers and max(layers) >= cfg.num_hidden_layers else ""
        raise ValueError(f"{directory}: unexpected tensor {extra[0]!r}{hint}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return params
