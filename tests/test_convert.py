"""The converter: round trips against transformers, FP8 bit-exactness, bad input, kill/resume, memory.

Sources are written by these tests from tiny random `Mistral4ForCausalLM` weights (float32 numpy):
HF text-only and multimodal names, fused and per-expert experts, one file or shards with an index,
Mistral native names, FP8 per tensor / per expert and 128x128 blocks with ragged edges.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming

import mistral4_jax
from mistral4_jax import sharding
from mistral4_jax.weights import checkpoint, hf
from mistral4_jax.weights.quant import QuantArray
from mistral4_jax.cli import main as cli_main
from mistral4_jax.convert import convert
from helpers import REPO, TINY, assert_logits_close, hf_config, make_hf_model

CFG = TINY.replace(num_hidden_layers=3, first_k_dense_replace=1)
"""One dense layer and two MoE layers (hidden 64, 8 experts)."""
BLOCK_CFG = TINY.replace(hidden_size=136, q_lora_rank=144, moe_intermediate_size=72)
"""Dims that are not multiples of 128: 128x128 FP8 blocks with ragged edges (2F = 144, D = 136)."""
IDS = np.array([[1, 17, 300, 42, 7, 99, 5, 250], [1, 8, 9, 10, 11, 12, 13, 14]])
FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e4m3fn": "F8_E4M3", "int32": "I32"}


# ------------------------------------------------------------------------------ writing sources
def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of numpy arrays of any dtype (bf16 and FP8 via ml_dtypes)."""
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": _ST[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def write_hf(directory: str, tensors: dict[str, np.ndarray], config: dict, shards: int = 1) -> str:
    """An HF checkpoint: config.json + model.safetensors, or `shards` files and an index."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "config.json"), config)
    names = list(tensors)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return directory
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k::shards]
        write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    write_json(os.path.join(directory, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
    return directory


def hf_dict(cfg, **extra) -> dict:
    d = cfg.to_hf_dict()
    d.update(architectures=["Mistral4ForCausalLM"], **extra)
    return d


def per_expert(tensors: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Fused experts (`experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F], their [E, 1, 1] FP8 scales
    and [E] activation scales) split per expert."""
    out, f = {}, cfg.moe_intermediate_size
    for name, a in tensors.items():
        head, _, tail = name.partition("mlp.experts.")
        if not tail or tail[0].isdigit():
            out[name] = a
            continue
        proj, suffix = ("gate_up_proj", tail[len("gate_up_proj"):]) if tail.startswith("gate_up") else ("down_proj", tail[len("down_proj"):])
        suffix = {"": ".weight", "_scale_inv": ".weight_scale_inv", "_activation_scale": ".activation_scale"}[suffix]
        for e in range(a.shape[0]):
            p = f"{head}mlp.experts.{e}."
            if proj == "down_proj":
                out[p + "down_proj" + suffix] = a[e] if suffix == ".weight" else a[e].reshape(())
            elif suffix == ".weight":
                out[p + "gate_proj" + suffix], out[p + "up_proj" + suffix] = a[e, :f], a[e, f:]
            else:
                out[p + "gate_proj" + suffix] = out[p + "up_proj" + suffix] = a[e].reshape(())
    return out


def multimodal(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Text names as `Mistral3ForConditionalGeneration` saves them, plus two vision tensors."""
    out = {("language_model." + n): a for n, a in tensors.items()}
    out["vision_tower.transformer.layers.0.attention.q_proj.weight"] = np.ones((8, 8), np.float32)
    out["multi_modal_projector.linear_1.weight"] = np.ones((4, 8), np.float32)
    return out


# Mistral native names. Their HF names come from transformers' own loading map for Mistral's native layout
# (`conversion_mapping`, "mistral_large4" + "mistral_large4_text": the same names as Mistral 4's consolidated
# checkpoint) and its FP8 quantizer's `qscale_weight` rename; what that map lacks is written here, from HF
# `Mistral4ForCausalLM`'s module names: the query LoRA (Mistral Large 3 has none), `qscale_act` and the
# per-expert names (transformers fuses the experts on load: gate_up_proj from [w1, w3], down_proj from w2).
_TF_RENAMES = [t for t in (*get_checkpoint_conversion_mapping("mistral_large4"),
                           *get_checkpoint_conversion_mapping("mistral_large4_text")) if isinstance(t, WeightRenaming)]
_TF_RENAMES.append(WeightRenaming(source_patterns=r"\.qscale_weight", target_patterns=".weight_scale_inv"))
_NOT_IN_TF = {".self_attn.wq_a.": ".self_attn.q_a_proj.", ".self_attn.wq_b.": ".self_attn.q_b_proj.",
              ".self_attn.q_a_norm.": ".self_attn.q_a_layernorm.", ".qscale_act": ".activation_scale",
              ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
NATIVE_GLOBALS = ("tok_embeddings", "norm", "output")
NATIVE_MODULES = ("attention_norm", "ffn_norm", "attention.wq_a", "attention.q_a_norm", "attention.wq_b",
                  "attention.wkv_a_with_mqa", "attention.kv_a_norm", "attention.wkv_b", "attention.wo", "gate",
                  "shared_experts.w1", "shared_experts.w2", "shared_experts.w3",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
NATIVE_SUFFIXES = ("weight", "qscale_weight", "qscale_act")


def tf_hf_name(name: str) -> str:
    """The HF text-model name of Mistral native tensor `name`, by transformers' map (see above)."""
    for t in _TF_RENAMES:
        name, _ = t.rename_source_key(name)
    name = name.replace("model.language_model.", "model.")
    for a, b in _NOT_IN_TF.items():
        name = name.replace(a, b)
    return name


def test_tf_map_fuses_experts_gate_first():
    """The per-expert names above follow transformers' expert converters: gate_up_proj = [w1 | w3], down_proj = w2."""
    fused = {t.target_patterns[0].rsplit(".", 1)[-1]: [p.split(".")[-2] for p in t._original_source_patterns]
             for t in get_checkpoint_conversion_mapping("mistral_large4_text")
             if isinstance(t, WeightConverter) and ".experts" in t.target_patterns[0]}
    assert fused == {"gate_up_proj": ["w1", "w3"], "down_proj": ["w2"]}


def native_names(cfg) -> dict[str, str]:
    """HF text name -> Mistral native name, for every tensor a native checkpoint of `cfg` may hold."""
    names = list(NATIVE_GLOBALS)
    for i in range(cfg.num_hidden_layers):
        names += [f"layers.{i}.{m}" for m in NATIVE_MODULES]
        names += [f"layers.{i}.experts.{e}.w{k}" for e in range(cfg.n_routed_experts) for k in (1, 2, 3)]
    out = {tf_hf_name(f"{n}.{s}"): f"{n}.{s}" for n in names for s in NATIVE_SUFFIXES}
    assert len(out) == len(names) * len(NATIVE_SUFFIXES)  # no two native names map to one HF name
    return out


def native(tensors: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Mistral native names (per-expert w1/w2/w3, qscale_weight / qscale_act) of per-expert HF tensors."""
    names = native_names(cfg)
    return {names[name]: a for name, a in per_expert(tensors, cfg).items()}


def test_native_names_are_transformers_names():
    """`hf.native_to_hf_name` (the converter's table) gives transformers' names for every native tensor."""
    for hf_text, name in native_names(CFG).items():
        assert hf.native_to_hf_name(name) == hf_text, name
    assert hf.native_to_hf_name("layers.0.attention.wq.weight") == tf_hf_name("layers.0.attention.wq.weight")  # no q LoRA
    assert hf.native_to_hf_name("model.layers.0.mlp.gate.weight") is None  # an HF name is not a native one


def params_json(cfg, **extra) -> dict:
    """A Mistral params.json for `cfg`."""
    return {
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "hidden_dim": cfg.intermediate_size,
        "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_attention_heads, "head_dim": cfg.qk_head_dim,
        "norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size, "tied_embeddings": False,
        "max_seq_len": cfg.max_position_embeddings, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.rope_theta,
        "yarn": {"factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_max_position_embeddings,
                 "beta": cfg.beta_fast, "alpha": cfg.beta_slow, "apply_scale": False},
        "llama_4_scaling": {"original_max_position_embeddings": cfg.original_max_position_embeddings,
                            "beta": cfg.llama_4_scaling_beta},
        "moe": {"num_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                "first_k_dense_replace": cfg.first_k_dense_replace, "num_shared_experts": cfg.n_shared_experts,
                "expert_hidden_dim": cfg.moe_intermediate_size, "routed_scale": cfg.routed_scaling_factor,
                "num_expert_groups": cfg.n_group, "num_expert_groups_per_tok": cfg.topk_group},
        **extra,
    }


def write_native(directory: str, tensors: dict[str, np.ndarray], params: dict, shards: int = 1) -> str:
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "params.json"), params)
    names = list(tensors)
    files = ["consolidated.safetensors"] if shards == 1 else [f"consolidated-{k:05d}.safetensors" for k in range(shards)]
    for k, file in enumerate(files):
        write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in names[k :: len(files)]})
    return directory


# ------------------------------------------------------------------------------------------- FP8
_LINEAR = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_names(tensors: dict[str, np.ndarray]) -> list[str]:
    """The tensors of the released FP8 layout: attention, dense, shared and routed expert projections."""
    return [n for n in tensors if (n.endswith(".weight") and n.split(".")[-2] in _LINEAR and ".mlp.gate." not in n)
            or n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]


def quantize(tensors: dict[str, np.ndarray], block: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(FP8 checkpoint tensors, their exact dequantisation in float32) in the released HF layout.

    Per tensor (block None): scalar `weight_scale_inv`, fused experts [E, 1, 1]. Blocks: a scale per
    block x block tile, [ceil(out/b), ceil(in/b)] (fused experts [E, ., .]), ragged edge tiles included.
    """
    out, deq = dict(tensors), dict(tensors)
    for name in fp8_names(tensors):
        w = tensors[name].astype(np.float32)
        fused = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        scale_name = name + "_scale_inv" if fused else name[: -len("weight")] + "weight_scale_inv"
        act_name = name + "_activation_scale" if fused else name[: -len("weight")] + "activation_scale"
        if block is None:
            lead = w.shape[:1] if w.ndim == 3 else ()
            amax = np.abs(w).reshape(*lead, -1).max(-1).reshape(lead + (1,) * (w.ndim - len(lead)))
            scale = (amax / 448.0).astype(np.float32).reshape(lead + (1, 1) if lead else ())
            full = scale
        else:
            rows, cols = w.shape[-2:]
            r, c = np.arange(rows) // block, np.arange(cols) // block
            tiles = np.zeros(w.shape[:-2] + (math.ceil(rows / block), math.ceil(cols / block)), np.float32)
            for i in range(tiles.shape[-2]):
                for j in range(tiles.shape[-1]):
                    tile = w[..., i * block : (i + 1) * block, j * block : (j + 1) * block]
                    tiles[..., i, j] = np.abs(tile).max(axis=(-2, -1)) / 448.0
            scale, full = tiles, tiles[..., r[:, None], c[None, :]]
        q = np.clip(w / full, -448, 448).astype(FP8)
        out[name], out[scale_name] = q, scale
        out[act_name] = np.full(w.shape[:1] if w.ndim == 3 else (), 0.5, np.float32)
        deq[name] = q.astype(np.float32) * full
    return out, deq


def fp8_config(cfg, block: int | None) -> dict:
    q = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [block, block] if block else None,
         "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    return hf_dict(cfg, quantization_config=q)


# ---------------------------------------------------------------------------------- references
def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(cfg, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """transformers' float32 logits on IDS with these (text-only, fused) weights."""
    model = transformers.Mistral4ForCausalLM(hf_config(cfg)).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()})
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def bf16_round(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(BF16) for k, v in tensors.items()}


def restored(path: str, dtype=None) -> dict:
    return jax.tree_util.tree_map(np.asarray, checkpoint.restore_params(path, dtype)[1])


def assert_trees_equal(a: dict, b: dict) -> None:
    """Same structure, shapes, dtypes and bits."""
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, (jax.tree_util.keystr(path), x.dtype, x.shape, y.dtype, y.shape)
        assert np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)), \
            f"{jax.tree_util.keystr(path)} differs"


def run_cli(*args: str) -> int:
    return cli_main([*args, "--no-progress"] if args[0] == "convert" else list(args))


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """float32 weights (HF names, fused experts) of a random tiny model for CFG."""
    return numpy_state(make_hf_model(CFG, seed=1))


@pytest.fixture(scope="module")
def ref_f32(weights) -> np.ndarray:
    return hf_logits(CFG, weights)


@pytest.fixture(scope="module")
def ref_bf16(weights) -> np.ndarray:
    return hf_logits(CFG, bf16_round(weights))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, weights) -> str:
    """The float32 model as `save_pretrained` writes it, with tokenizer-ish side files."""
    d = str(tmp_path_factory.mktemp("saved"))
    model = transformers.Mistral4ForCausalLM(hf_config(CFG)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.save_pretrained(d)
    for name in ("tekken.json", "chat_template.jinja", "tokenizer_config.json"):
        with open(os.path.join(d, name), "w") as f:
            f.write(f"{name} contents\n")
    return d


@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory, weights) -> str:
    return write_hf(str(tmp_path_factory.mktemp("bf16")), bf16_round(weights), hf_dict(CFG))


@pytest.fixture(scope="module")
def bf16_out(tmp_path_factory, bf16_src) -> str:
    return convert(bf16_src, str(tmp_path_factory.mktemp("out") / "bf16"), dtype="bfloat16", progress=False)


# ------------------------------------------------------------------------------------ round trips
@pytest.fixture(scope="module")
def f32_out(tmp_path_factory, saved) -> str:
    return convert(saved, str(tmp_path_factory.mktemp("out") / "f32"), dtype="float32", progress=False)


def test_round_trip_float32_saved_by_transformers(saved, f32_out, ref_f32):
    dst = f32_out
    assert sorted(os.listdir(dst)) == sorted(["manifest.json", "config.json", "params", "source_config.json",
                                              "generation_config.json", "tekken.json", "chat_template.jinja",
                                              "tokenizer_config.json"])
    with open(os.path.join(dst, "tekken.json")) as f:
        assert f.read() == "tekken.json contents\n"
    assert checkpoint.read_config(dst) == CFG
    manifest = checkpoint.read_manifest(dst)
    assert manifest["dtype"] == "float32" and manifest["source"]["format"] == "hf"
    assert manifest["tensors"] == len(jax.tree_util.tree_leaves(checkpoint.disk_abstract(CFG, np.float32)))
    assert manifest["parameters"] == sum(int(np.prod(v.shape)) for v in make_hf_model(CFG).state_dict().values())
    model = mistral4_jax.load(dst, dtype="float32")
    assert_logits_close(ref_f32, model.logits(IDS))
    assert_trees_equal(restored(dst), jax.tree_util.tree_map(np.asarray, hf.read_params(saved, CFG, np.float32)))


def test_round_trip_bf16_fused_text(bf16_out, ref_bf16):
    model = mistral4_jax.load(bf16_out, dtype="bfloat16")
    assert jax.tree_util.tree_leaves(model.params)[0].dtype == np.dtype(BF16)
    assert_logits_close(ref_bf16, model.logits(IDS))


def test_round_trip_bf16_per_expert_multimodal_sharded(tmp_path, weights, bf16_out):
    src = write_hf(str(tmp_path / "src"), multimodal(per_expert(bf16_round(weights), CFG)),
                   {"model_type": "mistral3", "text_config": hf_dict(CFG), "vision_config": {}}, shards=3)
    dst = convert(src, str(tmp_path / "ckpt"), dtype="bfloat16", text_only=True, progress=False)
    manifest = checkpoint.read_manifest(dst)
    assert manifest["source"]["vision_tensors_skipped"] == 2 and manifest["text_only"]
    assert_trees_equal(restored(dst), restored(bf16_out))  # whose logits match transformers


def test_round_trip_float32_per_expert_in_memory_names(tmp_path, weights, f32_out):
    names = {("model.language_model." + n[len("model."):] if n.startswith("model.") else n): a
             for n, a in per_expert(weights, CFG).items()}
    src = write_hf(str(tmp_path / "src"), names, hf_dict(CFG), shards=2)
    dst = convert(src, str(tmp_path / "ckpt"), dtype="float32", progress=False)
    assert_trees_equal(restored(dst), restored(f32_out))  # whose logits match transformers


def test_round_trip_mistral_native(tmp_path, weights, f32_out):
    src = write_native(str(tmp_path / "src"), native(weights, CFG), params_json(CFG), shards=2)
    dst = convert(src, str(tmp_path / "ckpt"), dtype="float32", progress=False)
    assert checkpoint.read_config(dst) == CFG
    assert checkpoint.read_manifest(dst)["source"]["format"] == "mistral"
    assert os.path.isfile(os.path.join(dst, "params.json"))
    assert_trees_equal(restored(dst), restored(f32_out))  # whose logits match transformers


def vision_tensors(d: int = 16, f: int = 24, heads: int = 2, patch: int = 2) -> tuple[dict, dict, dict]:
    """(HF-named vision tensors, the same under Mistral's native names, params.json `vision_encoder`) of a
    random one-layer tower + projector for CFG (native wq / wk rows in interleaved-pair rope order)."""
    rng = np.random.default_rng(7)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    t, hd = CFG.hidden_size, d // heads
    l = "transformer.layers.0."
    hf_names = {"vision_tower.patch_conv.weight": r(d, 3, patch, patch), "vision_tower.ln_pre.weight": r(d),
                **{f"vision_tower.{l}attention.{x}_proj.weight": r(d, d) for x in "qkvo"},
                **{f"vision_tower.{l}feed_forward.{x}_proj.weight": r(f, d) for x in ("gate", "up")},
                f"vision_tower.{l}feed_forward.down_proj.weight": r(d, f),
                f"vision_tower.{l}attention_norm.weight": r(d), f"vision_tower.{l}ffn_norm.weight": r(d),
                "multi_modal_projector.norm.weight": r(d), "multi_modal_projector.patch_merger.merging_layer.weight": r(d, 4 * d),
                "multi_modal_projector.linear_1.weight": r(t, d), "multi_modal_projector.linear_2.weight": r(t, t)}
    table = {"vision_tower.": "vision_encoder.", "multi_modal_projector.norm.": "pre_mm_projector_norm.",
             "multi_modal_projector.patch_merger.": "patch_merger.", "multi_modal_projector.linear_1.": "vision_language_adapter.w_in.",
             "multi_modal_projector.linear_2.": "vision_language_adapter.w_out.", "attention.q_proj": "attention.wq",
             "attention.k_proj": "attention.wk", "attention.v_proj": "attention.wv", "attention.o_proj": "attention.wo",
             "feed_forward.gate_proj": "feed_forward.w1", "feed_forward.down_proj": "feed_forward.w2",
             "feed_forward.up_proj": "feed_forward.w3"}
    native_names = {}
    for name, a in hf_names.items():
        for x, y in table.items():
            name = name.replace(x, y)
        if name.endswith(("wq.weight", "wk.weight")):
            a = a.reshape(heads, 2, hd // 2, d).transpose(0, 2, 1, 3).reshape(d, d)
        native_names[name] = a
    encoder = {"hidden_size": d, "num_channels": 3, "image_size": 32, "patch_size": patch, "intermediate_size": f,
               "num_hidden_layers": 1, "num_attention_heads": heads, "rope_theta": 10000.0, "image_token_id": 10,
               "image_break_token_id": 12, "image_end_token_id": 13, "spatial_merge_size": 2, "adapter_bias": False,
               "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}
    return hf_names, native_names, encoder


def test_vision_from_hf_and_native_names_fp8_kept_bf16(tmp_path, weights, f32_out):
    """The vision tower + projector are converted (HF and native names give the same arrays, equal to
    `vision.read_vision_params` of the source), bf16 beside FP8 text weights; `--text-only` skips them; a
    multimodal source without a usable vision config asks for `--text-only`."""
    from mistral4_jax.model.vision_config import VisionConfig
    from mistral4_jax.weights.vision import read_vision_params

    hf_v, native_v, encoder = vision_tensors()
    hf_cfg = {"model_type": "mistral3", "text_config": hf_dict(CFG), "tie_word_embeddings": False,
              "vision_config": {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 24, "patch_size": 2, "image_size": 32, "hidden_act": "silu"},
              "spatial_merge_size": 2, "image_token_index": 10, "projector_hidden_act": "gelu"}
    mm = {("language_model." + n): a for n, a in weights.items()}
    src = write_hf(str(tmp_path / "hf"), {**mm, **hf_v}, hf_cfg, shards=2)
    nat = write_native(str(tmp_path / "nat"), {**native(weights, CFG), **native_v}, params_json(CFG, vision_encoder=encoder))
    vcfg = VisionConfig.from_hf_dict(hf_cfg)
    expected = read_vision_params(lambda n, shape: hf_v[n], list(hf_v), vcfg)
    for source, name in ((src, "hf"), (nat, "nat")):
        dst = convert(source, str(tmp_path / f"{name}-f32"), dtype="float32", progress=False)
        assert checkpoint.read_vision_config(dst).hidden_size == 16
        assert_trees_equal(jax.tree_util.tree_map(np.asarray, checkpoint.restore_vision(dst)), expected)
        assert_trees_equal(restored(dst), restored(f32_out))
        assert checkpoint.read_manifest(dst)["vision"]["source_tensors"] == len(hf_v)
    fp8 = convert(src, str(tmp_path / "fp8"), dtype="float8_e4m3fn", progress=False)
    stored = {n: d for n, _, d in checkpoint.describe(fp8)[1]}
    assert stored["vision/projector/linear_1"] == "bfloat16" and stored["layers_moe/0/attn/q_b_proj"] == "float8_e4m3fn"
    text = convert(src, str(tmp_path / "text"), dtype="bfloat16", text_only=True, progress=False)
    assert checkpoint.read_vision_config(text) is None and not any(n.startswith("vision/") for n, _, _ in checkpoint.describe(text)[1])
    bad = write_hf(str(tmp_path / "bad"), {**mm, **hf_v}, {**hf_cfg, "vision_config": {}}, shards=1)
    with pytest.raises(ValueError, match="text-only"):
        convert(bad, str(tmp_path / "bad-out"), dtype="bfloat16", progress=False)


def test_float16_is_the_float32_conversion_rounded(saved, f32_out, weights, tmp_path, capsys):
    """--dtype float16 stores the float32 conversion rounded to float16 (vision too); a value beyond float16's
    range is refused, naming the tensor."""
    dst = str(tmp_path / "f16")
    assert run_cli("convert", saved, dst, "--dtype", "float16") == 0
    assert checkpoint.read_manifest(dst)["dtype"] == "float16"
    assert_trees_equal(restored(dst), jax.tree_util.tree_map(lambda x: x.astype(np.float16), restored(f32_out)))
    t = bf16_round(weights)
    t["model.layers.1.input_layernorm.weight"] = np.full(64, 1e5, BF16)
    src = write_hf(str(tmp_path / "big"), t, hf_dict(CFG))
    _expect_error(src, str(tmp_path / "big-f16"), capsys, "'model.layers.1.input_layernorm.weight'",
                  "beyond the range of float16", args=("--dtype", "float16"))


def test_restore_casts_float_checkpoints(bf16_out):
    as_f32 = restored(bf16_out, "float32")
    assert_trees_equal(as_f32, jax.tree_util.tree_map(lambda x: x.astype(np.float32), restored(bf16_out)))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        checkpoint.restore_params(bf16_out, "float8_e4m3fn")


def test_inspect(bf16_out, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(bf16_out))
    assert run_cli("inspect", os.path.basename(bf16_out)) == 0
    out = capsys.readouterr().out
    assert "dtype       bfloat16" in out and f"parameters  {checkpoint.read_manifest(bf16_out)['parameters']:,}" in out
    assert "layers_moe/attn/q_b_proj" in out and "[2, 32, 4, 16]" in out


def test_console_script(bf16_src, tmp_path):
    """`mistral4-jax convert` as installed (`python -m mistral4_jax.convert` runs in the resume tests below)."""
    dst = tmp_path / "ckpt"
    proc = subprocess.run([shutil.which("mistral4-jax") or "mistral4-jax", "convert", bf16_src, str(dst), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.is_checkpoint(dst)


# ------------------------------------------------------------------------------------------- FP8
@pytest.fixture(scope="module")
def fp8_tensor(tmp_path_factory, weights) -> tuple[str, dict, dict]:
    """(HF FP8 per-tensor / per-expert source, its tensors, their exact float32 dequantisation)."""
    q, deq = quantize(weights, None)
    return write_hf(str(tmp_path_factory.mktemp("fp8")), q, fp8_config(CFG, None)), q, deq


def _reference(tmp_path, cfg, deq: dict) -> dict:
    """Our parameter tree of the test's own dequantisation (through the float HF reader)."""
    d = write_hf(str(tmp_path / "deq"), deq, hf_dict(cfg))
    return jax.tree_util.tree_map(np.asarray, hf.read_params(d, cfg, np.float32))


def test_fp8_per_tensor_dequantised_bit_exact(fp8_tensor, tmp_path):
    src, _, deq = fp8_tensor
    ref = _reference(tmp_path, CFG, deq)
    assert_trees_equal(restored(convert(src, str(tmp_path / "f32"), dtype="float32", progress=False)), ref)
    bf16 = restored(convert(src, str(tmp_path / "bf16"), dtype="bfloat16", progress=False))
    assert_trees_equal(bf16, jax.tree_util.tree_map(lambda x: x.astype(BF16), ref))


def hf_name(name: str) -> str:
    """The HF text-model name of a source tensor (HF, multimodal on disk, or Mistral native names)."""
    name = name.removeprefix("language_model.")
    if not name.startswith("layers."):  # HF names, or a native global (tok_embeddings, norm, output)
        return name
    return tf_hf_name(name)


def our_layout(name: str, w: np.ndarray, cfg) -> list[tuple[str, int | None, np.ndarray]]:
    """Where an HF linear weight (`name` an HF text name, `w` its stored array, [out, in] or fused [E, ...])
    lands in our per-layer tree: [(path, expert index or None, the array there)], from HF's layout."""
    n, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    module = name.removesuffix(".weight").split(".", 3)[3]  # model.layers.<i>.<module>
    if module.startswith("mlp.experts.") and module.split(".")[2].isdigit():
        _, _, e, proj = module.split(".")
        return [({"gate_proj": "moe/experts_gate", "up_proj": "moe/experts_up", "down_proj": "moe/experts_down"}[proj],
                 int(e), w.T)]
    if module == "mlp.experts.gate_up_proj":
        f = w.shape[1] // 2
        return [("moe/experts_gate", None, w[:, :f].transpose(0, 2, 1)), ("moe/experts_up", None, w[:, f:].transpose(0, 2, 1))]
    if module == "mlp.experts.down_proj":
        return [("moe/experts_down", None, w.transpose(0, 2, 1))]
    if module == "self_attn.kv_b_proj":
        kv = w.T.reshape(cfg.kv_lora_rank, n, nope + v)
        return [("attn/k_b_proj", None, kv[..., :nope]), ("attn/v_b_proj", None, kv[..., nope:])]
    heads = {"self_attn.q_b_proj": (cfg.q_lora_rank, n, -1), "self_attn.q_proj": (cfg.hidden_size, n, -1),
             "self_attn.o_proj": (n, v, -1)}
    path = {"self_attn.q_a_proj": "attn/q_a_proj", "self_attn.q_b_proj": "attn/q_b_proj", "self_attn.q_proj": "attn/q_proj",
            "self_attn.kv_a_proj_with_mqa": "attn/kv_a_proj", "self_attn.o_proj": "attn/o_proj"}.get(module)
    if path is None:
        path = module.replace("mlp.shared_experts.", "moe/shared_expert/").replace("mlp.", "mlp/")
    return [(path, None, w.T.reshape(heads[module]) if module in heads else w.T)]


def assert_fp8_kept(tensors: dict[str, np.ndarray], stored: dict, cfg) -> int:
    """Every linear weight of the source `tensors` against `stored` (a converted FP8 checkpoint's tree as
    stored): FP8 sources stored bit for bit (bytes) with a bit-equal scale, bf16 sources stored as the same
    bf16 bytes without a scale. Returns the number of FP8 source tensors checked."""
    checked = 0
    for name, w in tensors.items():
        canon = hf_name(name)
        if not canon.startswith("model.layers.") or canon.endswith(("_scale_inv", "activation_scale")) \
                or "norm" in canon or ".mlp.gate." in canon:
            continue
        i = int(canon.split(".")[2])
        group, j = ("layers_dense", i) if i < cfg.first_k_dense_replace else ("layers_moe", i - cfg.first_k_dense_replace)
        scale = None
        if w.dtype == FP8:
            scale_name = name + "_scale_inv" if canon.endswith("_proj") else name.rsplit(".", 1)[0] + (
                ".weight_scale_inv" if name.startswith(("model.", "language_model.")) else ".qscale_weight")
            scale, checked = tensors[scale_name], checked + 1
        for path, expert, want in our_layout(canon, w, cfg):
            node = stored[group]
            for key in path.split("/")[:-1]:
                node = node[key]
            stored_w = node[path.split("/")[-1]]
            values = stored_w.values if isinstance(stored_w, QuantArray) else stored_w
            pick = (lambda a: a[j]) if expert is None else (lambda a: a[j][expert])
            got = pick(values)
            assert got.dtype == w.dtype and got.shape == want.shape, (name, path, got.dtype, got.shape, want.shape)
            assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), f"{name} -> {path} differs"
            if scale is None:
                assert not isinstance(stored_w, QuantArray), f"{name} is {w.dtype} but {path} has a scale"
            else:
                got_scale = pick(stored_w.scale).reshape(-1)
                assert np.array_equal(got_scale.view(np.uint32), np.asarray(scale, np.float32).reshape(-1).view(np.uint32)), \
                    f"{name}: scale {got_scale} stored for {path}, source {scale}"
    return checked


def bf16_except_fp8(weights: dict[str, np.ndarray], keep_bf16: tuple[str, ...]) -> tuple[dict, dict]:
    """(FP8 source tensors, exact float32 dequantisation): `quantize(weights, None)` with every other tensor
    in bf16, and those whose names end with `keep_bf16` in bf16 too, without scales (the released checkpoint
    keeps `kv_a_proj_with_mqa` in bf16)."""
    q, deq = quantize(weights, None)
    for name, w in weights.items():
        if name.endswith(keep_bf16):
            base = name.removesuffix("weight")  # "X." of a linear "X.weight"; fused experts have no suffix
            for scale in (base + "weight_scale_inv", base + "activation_scale", name + "_scale_inv", name + "_activation_scale"):
                q.pop(scale, None)
        elif q[name].dtype == FP8:
            continue
        q[name] = w.astype(BF16)
        deq[name] = q[name].astype(np.float32)
    return q, deq


_FP8_CASES = {  # case: (source tensors kept in bf16, the `float_weights` expected)
    "hf-fused-released": ((".kv_a_proj_with_mqa.weight",), ["layers_dense/attn/kv_a_proj", "layers_moe/attn/kv_a_proj"]),
    "hf-per-expert": (("mlp.experts.down_proj",), ["layers_moe/moe/experts_down"]),
    "native-released": ((".kv_a_proj_with_mqa.weight",), ["layers_dense/attn/kv_a_proj", "layers_moe/attn/kv_a_proj"]),
}


@pytest.fixture(scope="module")
def fp8_cases(tmp_path_factory, weights) -> dict[str, tuple[dict, str, dict, list]]:
    """{case: (source tensors, their FP8 conversion, exact float32 dequantisation (HF fused names), expected
    `float_weights`)}: HF fused experts in the released layout (kv_a_proj_with_mqa bf16) read in many small
    pieces (as real-sized tensors are); HF per-expert, per-expert scales, kv_a FP8 and the experts' down_proj
    bf16; Mistral native names (`qscale_weight`) in the released layout."""
    out = {}
    for case, (keep_bf16, floats) in _FP8_CASES.items():
        q, deq = bf16_except_fp8(weights, keep_bf16)
        d = tmp_path_factory.mktemp(case)
        if case == "hf-fused-released":
            tensors = q
            src = write_hf(str(d / "src"), q, fp8_config(CFG, None))
        elif case == "hf-per-expert":
            tensors = per_expert(q, CFG)
            src = write_hf(str(d / "src"), tensors, fp8_config(CFG, None), shards=2)
        else:
            tensors = native(q, CFG)
            src = write_native(str(d / "src"), tensors, params_json(CFG, quantization={"qformat_weight": "fp8_e4m3"}))
        with pytest.MonkeyPatch.context() as mp:
            if case == "hf-fused-released":
                mp.setattr("mistral4_jax.convert.lazy._PIECE_BYTES", 1024)  # 2-D tensors in blocks of 4-8 rows
            dst = convert(src, str(d / "fp8"), dtype="float8_e4m3fn", progress=False)
        out[case] = (tensors, dst, deq, floats)
    return out


@pytest.mark.parametrize("case", _FP8_CASES)
def test_fp8_kept_bit_for_bit(fp8_cases, case):
    """Every FP8 tensor of the source is stored with the same bytes and scale (after our transposes, head
    reshapes, kv_b / gate_up splits, expert stacking); bf16 sources of FP8-typed weights stay bf16, listed
    in the manifest's `float_weights`."""
    tensors, dst, _, floats = fp8_cases[case]
    stored = restored(dst)
    assert assert_fp8_kept(tensors, stored, CFG) == sum(a.dtype == FP8 for a in tensors.values()) > 20
    assert checkpoint.read_manifest(dst)["float_weights"] == floats
    assert stored["layers_moe"]["moe"]["router"].dtype == np.dtype(BF16)
    assert stored["layers_moe"]["attn"]["kv_a_proj"].dtype == np.dtype(BF16 if "layers_moe/attn/kv_a_proj" in floats else FP8)


def test_fp8_kept_logits_match_transformers(fp8_cases, tmp_path):
    """The FP8-kept models' logits match transformers on the dequantised weights; dequantised on restore they
    are the exact dequantisation; native names give the same checkpoint as HF names; on a mesh the weights
    kept in bf16 are placed like their FP8 counterparts."""
    for case in ("hf-per-expert", "hf-fused-released"):
        _, dst, deq, _ = fp8_cases[case]
        model = mistral4_jax.load(dst, dtype="float8_e4m3fn")
        assert model.dtype == np.dtype(FP8)
        assert_logits_close(hf_logits(CFG, deq), model.logits(IDS))
    stored = restored(dst)
    mesh = sharding.make_mesh("data=1,expert=2,tensor=2", jax.devices()[:4])
    on_mesh = mistral4_jax.load(dst, dtype="float8_e4m3fn", mesh=mesh).params
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, on_mesh), stored)
    assert_trees_equal(restored(fp8_cases["native-released"][1]), stored)
    assert_trees_equal(restored(dst, "float32"), _reference(tmp_path, CFG, deq))


def test_fp8_sources_that_cannot_be_kept(weights, tmp_path, capsys):
    """A weight FP8 in one layer and bf16 in another, or an FP8 router (stored bf16 by the model), is
    refused for --dtype float8_e4m3fn, naming the tensors."""
    q, _ = bf16_except_fp8(weights, ())
    mixed = dict(q)
    kv_a = "model.layers.2.self_attn.kv_a_proj_with_mqa."
    mixed[kv_a + "weight"] = weights[kv_a + "weight"].astype(BF16)
    del mixed[kv_a + "weight_scale_inv"], mixed[kv_a + "activation_scale"]
    src = write_hf(str(tmp_path / "mixed"), mixed, fp8_config(CFG, None))
    _expect_error(src, str(tmp_path / "dst"), capsys, "'model.layers.1.self_attn.kv_a_proj_with_mqa.weight' is FP8",
                  "'model.layers.2.self_attn.kv_a_proj_with_mqa.weight' is bfloat16", "layers_moe/attn/kv_a_proj",
                  args=("--dtype", "float8_e4m3fn"))
    router = dict(q)
    router["model.layers.1.mlp.gate.weight"] = np.ones((8, 64), FP8)
    router["model.layers.1.mlp.gate.weight_scale_inv"] = np.float32(0.5)
    src = write_hf(str(tmp_path / "router"), router, fp8_config(CFG, None))
    _expect_error(src, str(tmp_path / "dst"), capsys, "'model.layers.1.mlp.gate.weight' is FP8", "moe/router",
                  "--dtype float32", args=("--dtype", "float8_e4m3fn"))


@pytest.fixture(scope="module")
def fp8_block(tmp_path_factory) -> tuple[str, dict, dict]:
    weights = numpy_state(make_hf_model(BLOCK_CFG, seed=2))
    q, deq = quantize(weights, 128)
    assert q["model.layers.0.mlp.experts.gate_up_proj_scale_inv"].shape == (8, 2, 2)  # ragged: 144 x 136
    return write_hf(str(tmp_path_factory.mktemp("fp8b")), q, fp8_config(BLOCK_CFG, 128)), q, deq


def test_fp8_block_ragged_dequantised_bit_exact(fp8_block, tmp_path):
    src, _, deq = fp8_block
    dst = convert(src, str(tmp_path / "f32"), dtype="float32", progress=False)
    assert_trees_equal(restored(dst), _reference(tmp_path, BLOCK_CFG, deq))
    assert_logits_close(hf_logits(BLOCK_CFG, deq), mistral4_jax.load(dst, dtype="float32").logits(IDS))


def test_fp8_block_cannot_stay_fp8(fp8_block, tmp_path, capsys):
    assert run_cli("convert", fp8_block[0], str(tmp_path / "x"), "--dtype", "float8_e4m3fn") == 1
    err = capsys.readouterr().err.strip()
    assert "block-scaled" in err and "--dtype bfloat16" in err and "model.layers.0.self_attn." in err and "\n" not in err
    assert not os.path.exists(tmp_path / "x")


def test_quantize_float_source_to_fp8(bf16_src, weights, tmp_path):
    dst = convert(bf16_src, str(tmp_path / "fp8"), dtype="float8_e4m3fn", progress=False)
    moe = restored(dst)["layers_moe"]["moe"]
    src = weights["model.layers.1.mlp.experts.down_proj"].astype(BF16).astype(np.float32).transpose(0, 2, 1)
    scale = moe["experts_down"].scale[0]
    assert np.array_equal(scale.reshape(-1), (np.abs(src).reshape(8, -1).max(1) / 448).astype(np.float32))
    err = np.abs(moe["experts_down"].values[0].astype(np.float32) * scale - src)
    assert np.all(err <= np.maximum(np.abs(src) * 2**-4, scale * 2**-9))


# ------------------------------------------------------------------------------------- bad input
def _expect_error(src: str, dst: str, capsys, *needles: str, args: tuple[str, ...] = ()) -> None:
    assert run_cli("convert", src, dst, *args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mistral4-jax convert: error:"), err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(dst)


@pytest.fixture
def sharded(tmp_path, weights) -> str:
    return write_hf(str(tmp_path / "src"), bf16_round(weights), hf_dict(CFG), shards=2)


def _index(src: str) -> tuple[str, dict]:
    path = os.path.join(src, "model.safetensors.index.json")
    with open(path) as f:
        return path, json.load(f)


def test_bad_missing_shard(sharded, tmp_path, capsys):
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    _expect_error(sharded, str(tmp_path / "dst"), capsys, "model-00002-of-00002.safetensors", "missing")


def test_bad_truncated_file(sharded, tmp_path, capsys):
    shard = os.path.join(sharded, "model-00001-of-00002.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 100)
    _expect_error(sharded, str(tmp_path / "dst"), capsys, "model-00001-of-00002.safetensors", "truncated")


def test_bad_header_length(sharded, tmp_path, capsys):
    shard = os.path.join(sharded, "model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    _expect_error(sharded, str(tmp_path / "dst"), capsys, "model-00002-of-00002.safetensors", "header length")


def test_bad_index_path_leaves_source(sharded, tmp_path, capsys):
    path, index = _index(sharded)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    write_json(path, index)
    _expect_error(sharded, str(tmp_path / "dst"), capsys, "../outside.safetensors", "leaves the checkpoint directory")


def test_hub_cache_layout_with_symlinked_shards(sharded, tmp_path):
    """A Hugging Face cache snapshot (every file a symlink to ../../blobs/<hash>) loads like the directory."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(sharded))):
        shutil.copy(os.path.join(sharded, name), repo / "blobs" / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / name)
    got = jax.tree_util.tree_map(np.asarray, hf.read_params(str(snap), CFG, np.float32))
    assert_trees_equal(got, jax.tree_util.tree_map(np.asarray, hf.read_params(sharded, CFG, np.float32)))


def test_bad_duplicate_tensor(tmp_path, weights, capsys):
    t = bf16_round(weights)
    t["language_model.model.norm.weight"] = t["model.norm.weight"]
    src = write_hf(str(tmp_path / "src"), t, hf_dict(CFG))
    _expect_error(src, str(tmp_path / "dst"), capsys, "duplicate tensor", "model.norm.weight")
    nat = native(weights, CFG)
    src = write_native(str(tmp_path / "nat"), nat, params_json(CFG), shards=2)
    write_safetensors(os.path.join(src, "consolidated-00002.safetensors"), {"norm.weight": nat["norm.weight"]})
    _expect_error(src, str(tmp_path / "dst"), capsys, "duplicate tensor 'norm.weight'", "consolidated-00002.safetensors")


def test_bad_missing_tensor(tmp_path, weights, capsys):
    t = bf16_round(weights)
    del t["model.layers.2.self_attn.kv_b_proj.weight"]
    src = write_hf(str(tmp_path / "src"), t, hf_dict(CFG))
    _expect_error(src, str(tmp_path / "dst"), capsys, "missing tensor 'model.layers.2.self_attn.kv_b_proj.weight'")


def test_bad_unexpected_tensor(tmp_path, weights, capsys):
    t = bf16_round(weights)
    t["model.layers.3.input_layernorm.weight"] = t["model.norm.weight"]
    src = write_hf(str(tmp_path / "src"), t, hf_dict(CFG))
    _expect_error(src, str(tmp_path / "dst"), capsys, "unexpected tensor 'model.layers.3.input_layernorm.weight'", "3 layers")


def test_bad_shape_vs_config(tmp_path, weights, capsys):
    src = write_hf(str(tmp_path / "src"), bf16_round(weights), hf_dict(CFG, moe_intermediate_size=16))
    _expect_error(src, str(tmp_path / "dst"), capsys, "model.layers.1.mlp.experts.gate_up_proj", "has shape (8, 64, 64)")


def test_bad_dtype(tmp_path, weights, capsys):
    t = bf16_round(weights)
    t["model.layers.0.post_attention_layernorm.weight"] = np.ones(64, np.int32)
    src = write_hf(str(tmp_path / "src"), t, hf_dict(CFG))
    _expect_error(src, str(tmp_path / "dst"), capsys, "post_attention_layernorm.weight", "unsupported dtype int32")


_CRASH_PICKLE = b"cos\n_exit\n(I97\ntR."
"""A pickle that would end the process (os._exit(97)) if it were ever unpickled."""


@pytest.mark.parametrize("files", [("pytorch_model.bin",), ("model.pt",), ("consolidated.00.pth",)])
def test_pickle_weights_refused(tmp_path, capsys, files):
    src = tmp_path / "src"
    src.mkdir()
    write_json(src / ("params.json" if files[0].startswith("consolidated") else "config.json"),
               params_json(CFG) if files[0].startswith("consolidated") else hf_dict(CFG))
    for name in files:
        (src / name).write_bytes(_CRASH_PICKLE)
    _expect_error(str(src), str(tmp_path / "dst"), capsys, files[0], "refused")


def test_pickle_shard_in_index_refused(sharded, tmp_path, capsys):
    path, index = _index(sharded)
    with open(os.path.join(sharded, "pytorch_model-00001.bin"), "wb") as f:
        f.write(_CRASH_PICKLE)
    index["weight_map"] = {n: "pytorch_model-00001.bin" for n in index["weight_map"]}
    write_json(path, index)
    _expect_error(sharded, str(tmp_path / "dst"), capsys, "pytorch_model-00001.bin", "pickle weights are refused")


def test_bad_source_and_existing_destination(bf16_src, bf16_out, tmp_path, capsys):
    _expect_error(str(tmp_path / "nowhere"), str(tmp_path / "dst"), capsys, "nowhere", "not found")
    manifest = os.path.join(bf16_out, "manifest.json")
    before = os.path.getmtime(manifest)
    assert run_cli("convert", bf16_src, bf16_out) == 1
    assert "already exists" in capsys.readouterr().err and os.path.getmtime(manifest) == before
    dst = str(tmp_path / "copy")
    shutil.copytree(bf16_out, dst)
    assert run_cli("convert", bf16_src, dst, "--overwrite", "--dtype", "float32") == 0
    assert checkpoint.read_manifest(dst)["dtype"] == "float32"


# ----------------------------------------------------------------------------------- kill / resume
def test_killed_conversion_leaves_no_dst_and_resumes_identically(bf16_src, bf16_out, tmp_path):
    dst = str(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "mistral4_jax.convert", bf16_src, dst, "--no-progress"]
    env = {**os.environ, "MISTRAL4_JAX_CONVERT_KILL_AFTER": "2"}  # after globals + layer 0, before the journal
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    tmp = tmp_path / ".ckpt.converting"
    assert not os.path.exists(dst) and tmp.is_dir()
    with pytest.raises(FileExistsError, match="an interrupted conversion is in .*: pass --resume"):  # in-process: 3 s less
        convert(bf16_src, dst, progress=False)
    assert not os.path.exists(dst)
    env["MISTRAL4_JAX_CONVERT_KILL_AFTER"] = "2"  # piece 2 found on disk, piece 3 written, killed again
    assert subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True).returncode == -9
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not tmp.exists()
    assert_trees_equal(restored(dst), restored(bf16_out))
    assert checkpoint.read_manifest(dst)["tensors"] == checkpoint.read_manifest(bf16_out)["tensors"]


_SIGINT_DRIVER = """
import asyncio, json, os, signal, sys
from orbax.checkpoint.experimental.v1._src.partial import saving
from mistral4_jax.cli import main
from mistral4_jax.convert import lazy

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started in the background
where, n = None, 0

def interrupt(point):  # SIGINT to this process on the n-th call at `point`
    global n
    if point == where:
        n -= 1
        if n == 0:
            os.kill(os.getpid(), signal.SIGINT)

read = lazy.SourceTensor.read  # while a source tensor is read
lazy.SourceTensor.read = lambda *a, **k: (interrupt("read"), read(*a, **k))[1]
save_async = saving.save_async  # while Orbax writes a piece in its threads
saving.save_async = lambda *a, **k: (save_async(*a, **k), interrupt("save"))[0]
merge_all = saving._merge_all  # inside Orbax's finalize (an asyncio loop on this thread)
async def merge(*a):
    interrupt("finalize")
    await asyncio.sleep(0.01)
    return await merge_all(*a)
saving._merge_all = merge

codes = []
for phase in sys.argv[1].split(","):  # "read:30,save:2": one conversion (resumed) interrupted at each
    where, n = phase.split(":")[0], int(phase.split(":")[1])
    codes.append(main(["convert", *sys.argv[2:], "--no-progress", "--resume"]))
print(json.dumps(codes))
sys.exit(codes[-1])
"""


def test_ctrl_c_exits_130_with_one_line_and_resumes_identically(bf16_src, bf16_out, tmp_path):
    """SIGINT while a source tensor is read, then (resumed) while Orbax saves a piece in its threads (the
    process then exits), then (resumed, in a second process) inside Orbax's finalize: each time exit status
    130, one line on stderr naming the kept directory, no DST; --resume finishes it into the checkpoint an
    uninterrupted conversion writes."""
    dst, tmp = str(tmp_path / "ckpt"), str(tmp_path / ".ckpt.converting")
    line = f"mistral4-jax convert: interrupted: partial conversion kept in {tmp}; rerun with --resume to finish it"
    for phases in ("read:30,save:2", "finalize:1"):
        proc = subprocess.run([sys.executable, "-c", _SIGINT_DRIVER, phases, bf16_src, dst], capture_output=True,
                              text=True, timeout=300)
        n = phases.count(":")
        assert proc.returncode == 130 and json.loads(proc.stdout) == [130] * n, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [line] * n, proc.stderr
        assert not os.path.exists(dst) and os.path.isdir(tmp)
    convert(bf16_src, dst, dtype="bfloat16", resume=True, progress=False)
    assert not os.path.exists(tmp)
    assert_trees_equal(restored(dst), restored(bf16_out))
    assert checkpoint.read_manifest(dst)["tensors"] == checkpoint.read_manifest(bf16_out)["tensors"]


def test_resume_refuses_another_source(bf16_src, tmp_path, weights, capsys):
    dst = str(tmp_path / "ckpt")
    env = {**os.environ, "MISTRAL4_JAX_CONVERT_KILL_AFTER": "1"}
    cmd = [sys.executable, "-m", "mistral4_jax.convert", bf16_src, dst, "--no-progress"]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == -9
    other = write_hf(str(tmp_path / "other"), bf16_round(weights), hf_dict(CFG), shards=2)
    _expect_error(other, dst, capsys, "cannot resume", "source_sha256", args=("--resume",))


# ---------------------------------------------------------------------------------------- memory
RSS_CFG = TINY.replace(hidden_size=512, n_routed_experts=32, moe_intermediate_size=1024, num_hidden_layers=4,
                       vocab_size=1024, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                       v_head_dim=32)
_RSS_DRIVER = """
import json, sys
import jax, jax.numpy as jnp
from mistral4_jax.convert import convert

def peak_mb():  # VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

jnp.zeros(1).block_until_ready()
base = peak_mb()
convert(sys.argv[1], sys.argv[2], dtype="bfloat16", progress=False)
print(json.dumps({"base_mb": base, "peak_mb": peak_mb()}))
"""


def _synthetic_fp8(directory: str, cfg) -> None:
    """A random FP8 per-tensor checkpoint for `cfg`, one shard per layer (never all in memory here)."""
    rng = np.random.default_rng(0)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in transformers.Mistral4ForCausalLM(hf_config(cfg)).state_dict().items()}
    fp8 = set(fp8_names(dict.fromkeys(shapes)))
    weight_map = {}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[2] if name.startswith("model.layers.") else "g"
        groups.setdefault(layer, []).append(name)
    for layer, names in groups.items():
        tensors = {}
        for name in names:
            if name in fp8:
                tensors[name] = rng.integers(0, 0x7E, size=shapes[name], dtype=np.uint8).view(FP8)
                lead = shapes[name][:1] + (1, 1) if len(shapes[name]) == 3 else ()
                fused = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
                tensors[(name + "_scale_inv") if fused else name[:-6] + "weight_scale_inv"] = np.full(lead, 0.01, np.float32)
            else:
                tensors[name] = rng.standard_normal(shapes[name], np.float32).astype(BF16)
        file = f"layer-{layer}.safetensors"
        write_safetensors(os.path.join(directory, file), tensors)
        weight_map.update(dict.fromkeys(tensors, file))
    write_json(os.path.join(directory, "model.safetensors.index.json"), {"weight_map": weight_map})
    write_json(os.path.join(directory, "config.json"), fp8_config(cfg, None))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_peak_memory_is_about_one_layer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _synthetic_fp8(str(src), RSS_CFG)
    abstract = mistral4_jax.model.abstract_params(RSS_CFG, np.dtype(BF16))
    layer_mb = sum(x.size * 2 for x in jax.tree_util.tree_leaves(abstract["layers_moe"])) / RSS_CFG.num_hidden_layers / 2**20
    proc = subprocess.run([sys.executable, "-c", _RSS_DRIVER, str(src), str(tmp_path / "dst")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = rss["peak_mb"] - rss["base_mb"]
    print(f"layer {layer_mb:.0f} MB (bf16), {RSS_CFG.num_hidden_layers} layers: base {rss['base_mb']:.0f} MB, "
          f"peak {rss['peak_mb']:.0f} MB, grew {grew:.0f} MB")
    assert rss["peak_mb"] < layer_mb + 1536  # the bound
    assert grew < 1.3 * layer_mb + 100, "the converter holds more than about one layer"
