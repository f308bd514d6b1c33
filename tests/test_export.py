"""Export (`weights.export.write_hf`) against transformers: a tiny random float32 model read from HF, every
parameter perturbed (so a mapping that only works on HF's own tensors cannot pass), written back and loaded by
transformers' `Mistral4ForCausalLM`, must give our logits on the perturbed parameters (max |Δ| ≤ 1e-3, KL ≤ 1e-5)
and read back through `hf.read_params` bit for bit. Also: tied embeddings without q_lora, FP8 / unstacked inputs,
shards, the multimodal (Mistral3) layout, and refusals."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from mistral4_jax import Mistral4, Mistral4Config
from mistral4_jax import model as M
from mistral4_jax.weights import export, hf
from mistral4_jax.weights.lora import LoraWeight
from mistral4_jax.weights.quant import QuantArray
from mistral4_jax.weights.safetensors import TensorIndex
from mistral4_jax.weights.vision import read_vision_params
from mistral4_jax.model.vision_config import VisionConfig
from helpers import TINY, assert_logits_close, make_hf_model, save_hf

CFG = TINY.replace(first_k_dense_replace=1)  # layer 0 dense, layer 1 MoE
B, T = 2, 10


def _ids(cfg: Mistral4Config, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (B, T))


def _hf_logits(directory: str, ids: np.ndarray) -> np.ndarray:
    # transformers 5.25's AutoModelForCausalLM has no mistral4 entry (its own save_pretrained output fails too)
    ref = transformers.Mistral4ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids)).logits.numpy()


def _assert_trees_equal(got, want) -> None:
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    assert flat_got.keys() == flat_want.keys()
    for path, w in flat_want.items():
        np.testing.assert_array_equal(flat_got[path], np.asarray(w), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """(a random transformers model, its HF directory, our params read from it with every entry perturbed by
    0.01 noise)."""
    src = str(tmp_path_factory.mktemp("src"))
    ref = make_hf_model(CFG, seed=2)
    save_hf(ref, src)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32), hf.read_params(src, CFG))
    return ref, src, params


def test_export_loads_in_transformers_with_our_logits(perturbed, tmp_path):
    ref, src, params = perturbed
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tekken.json").write_text('{"fake": 1}')
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "unrelated.txt").write_text("x")
    dst = str(tmp_path / "out")
    assert export.write_hf(dst, params, CFG, dtype="float32", tokenizer_dir=tok) == dst
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tekken.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["out", "tok"]  # no temporary directory left
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["architectures"] == ["Mistral4ForCausalLM"] and config["model_type"] == "mistral4"
    assert Mistral4Config.from_hf_dict(config) == CFG
    with safe_open(os.path.join(dst, "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}

    ids = _ids(CFG)
    theirs = _hf_logits(dst, ids)
    ours = Mistral4(CFG, jax.tree.map(jnp.asarray, params)).logits(ids)
    assert_logits_close(theirs, ours)
    with torch.no_grad():
        unperturbed = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - unperturbed).max() > 1e-2  # the perturbation shows in the logits

    _assert_trees_equal(hf.read_params(dst, CFG), params)  # float32 round trip: exact
    names = set(export.hf_tensors(params, CFG))
    assert names == set(TensorIndex.open(src).names())  # the names transformers' save_pretrained writes


def test_inputs_unstacked_fp8_and_lora(perturbed):
    *_, params = perturbed
    want = export.hf_tensors(params, CFG)
    unstacked = export.hf_tensors(M.unstack_layers(params), CFG)
    assert all(np.array_equal(unstacked[k], want[k]) for k in want)

    gate = params["layers_moe"]["moe"]["experts_gate"]  # [layers, E, D, F]: an FP8 weight with per-expert scales
    scale = np.abs(gate).max(axis=(2, 3), keepdims=True) / 448
    q = QuantArray((gate / scale).astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32))
    fp8 = {**params, "layers_moe": {**params["layers_moe"], "moe": {**params["layers_moe"]["moe"], "experts_gate": q}}}
    got = export.hf_tensors(fp8, CFG)["model.layers.1.mlp.experts.gate_up_proj"]
    f = CFG.moe_intermediate_size
    deq = q.values[0].astype(np.float32) * q.scale[0]
    np.testing.assert_array_equal(got[:, :f], deq.transpose(0, 2, 1))
    np.testing.assert_array_equal(got[:, f:], want["model.layers.1.mlp.experts.gate_up_proj"][:, f:])

    base = params["layers_dense"]["attn"]["q_a_proj"]  # [layers, D, Q]: a LoRA adapter is merged
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((*base.shape[:2], 4), np.float32), rng.standard_normal((1, 4, base.shape[2]), np.float32)
    lora = LoraWeight(base, a, b, scale=0.5)
    tree = {**params, "layers_dense": {**params["layers_dense"], "attn": {**params["layers_dense"]["attn"], "q_a_proj": lora}}}
    got = export.hf_tensors(tree, CFG)["model.layers.0.self_attn.q_a_proj.weight"]
    np.testing.assert_allclose(got, (base[0] + 0.5 * a[0] @ b[0]).T, rtol=1e-6, atol=1e-6)


def test_tied_embeddings_without_q_lora(tmp_path):
    cfg = TINY.replace(q_lora_rank=None, tie_word_embeddings=True, num_hidden_layers=1)
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32),
                          M.init_params(cfg, jax.random.key(4)))  # norms off 1 too
    dst = str(tmp_path / "tied")
    export.write_hf(dst, params, cfg, dtype="float32", max_shard_bytes=100_000)  # sharded
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    files = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert "lm_head.weight" not in index["weight_map"] and "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    ids = _ids(cfg, 1)
    assert_logits_close(_hf_logits(dst, ids), Mistral4(cfg, params).logits(ids))
    _assert_trees_equal(hf.read_params(dst, cfg), params)

    bf16 = str(tmp_path / "bf16")  # bfloat16 export: the params rounded to bfloat16
    export.write_hf(bf16, params, cfg)
    assert json.load(open(os.path.join(bf16, "config.json")))["dtype"] == "bfloat16"
    _assert_trees_equal(hf.read_params(bf16, cfg), jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params))


def test_multimodal_export_round_trips(tmp_path):
    text = transformers.Mistral4Config(**{**TINY.to_hf_dict(), "num_hidden_layers": 1, "initializer_range": 0.1})
    vision = transformers.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=48, patch_size=4, image_size=64, hidden_act="silu")
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=10, spatial_merge_size=2,
                                         multimodal_projector_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases and norms too
    src = str(tmp_path / "src")
    ref.save_pretrained(src)
    raw = json.load(open(os.path.join(src, "config.json")))
    cfg, vcfg = Mistral4Config.from_hf_dict(raw), VisionConfig.from_hf_dict(raw)
    index = TensorIndex.open(src)
    vparams = read_vision_params(hf.HFReader(index, src, vision=True).get, index.names(), vcfg)
    params = hf.read_params(src, cfg)

    dst = str(tmp_path / "mm")
    export.write_hf(dst, params, cfg, dtype="float32", vision=(vparams, vcfg, {"vision_feature_layer": -1}))
    assert set(TensorIndex.open(dst).names()) == set(index.names())
    back = transformers.AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32)
    want, got = ref.state_dict(), back.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    out = TensorIndex.open(dst)
    _assert_trees_equal(read_vision_params(hf.HFReader(out, dst, vision=True).get, out.names(), vcfg), vparams)

    with pytest.raises(ValueError, match="'spatial_merge_size' would read back as 4"):
        export.write_hf(str(tmp_path / "bad"), params, cfg, vision=(vparams, vcfg, {"spatial_merge_size": 4}))
    no_bias = {**vparams, "projector": {k: v for k, v in vparams["projector"].items() if k != "linear_1_bias"}}
    with pytest.raises(ValueError, match="vision params: missing 'projector/linear_1_bias'"):
        export.write_hf(str(tmp_path / "bad"), params, cfg, vision=(no_bias, vcfg, None))
    assert not os.path.exists(tmp_path / "bad")


def test_refusals_leave_nothing(perturbed, tmp_path):
    *_, params = perturbed
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ValueError, match=f"{full} already exists"):
        export.write_hf(full, params, CFG)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export.write_hf(tmp_path / "a", params, CFG, dtype="int8")
    with pytest.raises(ValueError, match="'layers_dense/attn/k_b_proj' has shape"):
        export.write_hf(tmp_path / "b", params, CFG.replace(num_attention_heads=2))
    with pytest.raises(ValueError, match="missing 'lm_head'"):
        export.hf_tensors({k: v for k, v in params.items() if k != "lm_head"}, CFG)
    assert sorted(os.listdir(tmp_path)) == ["full"]
    (tmp_path / "empty").mkdir()
    export.write_hf(tmp_path / "empty", params, CFG)  # an empty directory is fine
    assert "model.safetensors" in os.listdir(tmp_path / "empty")
