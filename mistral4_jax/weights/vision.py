"""Reading the vision tower and projector weights (HF or Mistral native names) into the tree of
`model.vision` (layers stacked); native wq / wk rows are permuted to HF's rotate-half rope order."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from ..model.vision_config import VisionConfig
from .hf import is_vision_name

_SCALE_SUFFIXES = ("_scale_inv", ".weight_scale", ".activation_scale", ".input_scale", ".qscale_weight", ".qscale_act")
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def vision_names(names: Iterable[str]) -> tuple[str, str]:
    """(tower prefix, projector prefix) of the naming scheme used by a checkpoint's tensor names:
    ("vision_tower.", "multi_modal_projector.") on disk, ("model.vision_tower.", "model.multi_modal_projector.")
    in memory, or ("vision_encoder.", "") for Mistral's native names. ValueError if none or several."""
    names = [n for n in names if is_vision_name(n)]
    schemes = {("model.vision_tower.", "model.multi_modal_projector."): False,
               ("vision_tower.", "multi_modal_projector."): False, ("vision_encoder.", ""): False}
    for n in names:
        if n.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            schemes[("model.vision_tower.", "model.multi_modal_projector.")] = True
        elif n.startswith(("vision_tower.", "multi_modal_projector.")):
            schemes[("vision_tower.", "multi_modal_projector.")] = True
        else:
            schemes[("vision_encoder.", "")] = True
    found = [k for k, v in schemes.items() if v]
    if not found:
        raise ValueError("the checkpoint has no vision tensors (vision_tower.* / vision_encoder.*): it is text-only")
    if len(found) > 1:
        raise ValueError(f"the checkpoint mixes vision naming schemes: {[k[0] for k in found]}")
    return found[0]


def _permute_native_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Native wq/wk rows [N*H, D] (rope on interleaved pairs) -> HF's rotate-half row order
    (transformers' `permute_for_rope`): within each head, row 2i+a moves to a*H/2 + i."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def read_vision_params(get: Callable[[str, tuple[int, ...]], np.ndarray], names: Iterable[str], vcfg: VisionConfig,
                       dtype: Any = np.float32) -> dict[str, Any]:
    """The vision parameter tree (numpy, `dtype`, our layout, layers stacked) from a checkpoint.

    get(name, shape) -> float32 numpy array, checking the shape (and dequantising FP8), e.g. `hf.HFReader(index, where, block, vision=True).get`;
    names: every tensor name of the checkpoint (to pick the naming scheme and to reject unexpected vision tensors).

    HF names (prefix `vision_tower.` / `model.vision_tower.`, projector `multi_modal_projector.` /
    `model.multi_modal_projector.`), HF layouts [out, in]:
      patch_conv.weight [D, C, p, p] -> patch_embed.patch_conv [K, D];  ln_pre.weight -> patch_embed.ln_pre.scale
      transformer.layers.N.attention.{q,k,v}_proj.weight [N*H, D] -> layers.attention.{q,k,v}_proj [D, N, H]
      transformer.layers.N.attention.o_proj.weight [D, N*H] -> layers.attention.o_proj [N, H, D]
      transformer.layers.N.feed_forward.{gate,up}_proj.weight [F, D] -> [D, F]; down_proj [D, F] -> [F, D]
      transformer.layers.N.{attention_norm, ffn_norm}.weight -> layers.{attention_norm, ffn_norm}.scale
      norm.weight -> projector.norm.scale;  patch_merger.merging_layer.weight [D, D*W] -> merging_layer [W, D, D]
      linear_{1,2}.weight [T, .] -> linear_{1,2} [., T];  linear_{1,2}.bias -> linear_{1,2}_bias
    Native names (transformers' mistral3 converter's table): vision_encoder.{patch_conv, ln_pre},
    vision_encoder.transformer.layers.N.{attention.w{q,k,v,o}, feed_forward.w{1,3,2} (gate, up, down),
    attention_norm, ffn_norm}, pre_mm_projector_norm, patch_merger.merging_layer, vision_language_adapter.w_in
    / w_out (= linear_1 / linear_2); native wq / wk rows are permuted from interleaved to rotate-half rope.
    ValueError names a missing, mis-shaped or unexpected vision tensor.
    """
    names = list(names)
    tower, proj = vision_names(names)
    native = tower == "vision_encoder."
    c = vcfg
    d, n, h, f, t, k = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size, c.text_hidden_size, c.patch_dim
    w = c.spatial_merge_size ** 2
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        return np.asarray(get(name, shape), dtype=np.float32)

    def lin(name: str, out: int, inp: int) -> np.ndarray:
        return read(name + ".weight", (out, inp)).T

    pre = f"{tower}transformer.layers."
    layers: list[dict[str, Any]] = []
    for i in range(c.num_hidden_layers):
        p = f"{pre}{i}."
        if native:
            a = {x: read(f"{p}attention.w{x[0]}.weight", (n * h, d)) for x in ("q_proj", "k_proj", "v_proj")}
            a["q_proj"], a["k_proj"] = _permute_native_rope(a["q_proj"], n), _permute_native_rope(a["k_proj"], n)
            o = read(f"{p}attention.wo.weight", (d, n * h))
            mlp = {"gate_proj": lin(p + "feed_forward.w1", f, d), "up_proj": lin(p + "feed_forward.w3", f, d),
                   "down_proj": lin(p + "feed_forward.w2", d, f)}
        else:
            a = {x: read(f"{p}attention.{x}.weight", (n * h, d)) for x in ("q_proj", "k_proj", "v_proj")}
            o = read(f"{p}attention.o_proj.weight", (d, n * h))
            mlp = {x: lin(p + "feed_forward." + x, f, d) for x in ("gate_proj", "up_proj")}
            mlp["down_proj"] = lin(p + "feed_forward.down_proj", d, f)
        attn = {x: a[x].T.reshape(d, n, h) for x in ("q_proj", "k_proj", "v_proj")}
        attn["o_proj"] = o.T.reshape(n, h, d)
        layers.append({
            "attention_norm": {"scale": read(p + "attention_norm.weight", (d,))},
            "attention": attn,
            "ffn_norm": {"scale": read(p + "ffn_norm.weight", (d,))},
            "feed_forward": mlp,
        })
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)

    patch = read(tower + "patch_conv.weight", (d, c.num_channels, c.patch_size, c.patch_size)).reshape(d, k).T
    names_p = ({"norm": "pre_mm_projector_norm", "merge": "patch_merger.merging_layer", "l1": "vision_language_adapter.w_in",
                "l2": "vision_language_adapter.w_out"} if native else
               {"norm": proj + "norm", "merge": proj + "patch_merger.merging_layer", "l1": proj + "linear_1",
                "l2": proj + "linear_2"})
    merging = read(names_p["merge"] + ".weight", (d, d * w)).reshape(d, d, w).transpose(2, 1, 0)
    projector: dict[str, Any] = {
        "norm": {"scale": read(names_p["norm"] + ".weight", (d,))},
        "merging_layer": merging,
        "linear_1": lin(names_p["l1"], t, d),
        "linear_2": lin(names_p["l2"], t, t),
    }
    if c.multimodal_projector_bias:
        projector["linear_1_bias"] = read(names_p["l1"] + ".bias", (t,))
        projector["linear_2_bias"] = read(names_p["l2"] + ".bias", (t,))
    out = {
        "patch_embed": {"patch_conv": patch, "ln_pre": {"scale": read(tower + "ln_pre.weight", (d,))}},
        "layers": stacked,
        "projector": projector,
    }
    extra = sorted(x for x in names if is_vision_name(x) and x not in used and not x.endswith(_SCALE_SUFFIXES))
    if extra:
        layer_ids = [int(m.group(1)) for x in extra if (m := _LAYER_RE.search(x))]
        hint = (f" (the vision config has {c.num_hidden_layers} layers)"
                if layer_ids and max(layer_ids) >= c.num_hidden_layers else "")
        if not c.multimodal_projector_bias and any(x.endswith(".bias") for x in extra):
            hint += " (the config says multimodal_projector_bias = false)"
        raise ValueError(f"unexpected vision tensor {extra[0]!r}{hint}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), out)
