"""Config validation and the HF loader: sharded/multimodal names, and clear errors for bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mistral4_jax
from mistral4_jax import Mistral4Config
from helpers import REPO, TINY, assert_logits_close, make_hf_model, save_hf


def _hf_dict(**changes):
    d = TINY.to_hf_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": None}, "hidden_size"),
        ({"head_dim": 99}, "head_dim"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 5, "n_group": 4}, "topk_group"),
        ({"first_k_dense_replace": 7}, "first_k_dense_replace"),
        ({"qk_rope_head_dim": 7, "head_dim": 15}, "qk_rope_head_dim"),
        ({"hidden_act": "bogus"}, "'hidden_act' must be one of"),
        ({"hidden_act": "prelu"}, "hidden_act.*learned weights"),
        ({"rope_parameters": {"rope_type": "dynamic_yarn", "factor": 2.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "short_factor"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_parameters": {"rope_type": "proportional"}}, "needs qk_nope_head_dim 0"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0}}, "partial_rotary"),
        ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4,
                              "original_max_position_embeddings": 16}}, "rope_short_factor"),
        ({"pad_token_id": 10**6}, "pad_token_id"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        Mistral4Config.from_hf_dict(_hf_dict(**changes))


def test_configs_dir_and_multimodal_config(tmp_path):
    for name in os.listdir(os.path.join(REPO, "configs")):
        if name.endswith(".json"):
            Mistral4Config.from_json(os.path.join(REPO, "configs", name))
    mm = {"model_type": "mistral3", "text_config": TINY.to_hf_dict(), "vision_config": {"model_type": "pixtral"}}
    assert Mistral4Config.from_hf_dict(mm) == TINY
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Mistral4Config.from_json(tmp_path)
    with pytest.raises(ValueError, match="'bogus' is not a Mistral4Config field"):
        Mistral4Config.from_dict({"bogus": 1})


def test_explicit_softmax_scale_field():
    real = Mistral4Config.from_json(os.path.join(REPO, "configs", "mistral-small-4-119b.json"))
    assert real.softmax_scale == pytest.approx(0.19496949, rel=1e-6)  # HF's yarn mscale^2 rule
    plain = Mistral4Config.from_dict({**real.to_dict(), "softmax_scale": 128**-0.5})
    assert plain.softmax_scale == pytest.approx(0.0883883)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(TINY, seed=5)
    save_hf(hf, str(d))
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(1, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    return d, ids, ref


def _copy_with(src, dst, rename=None, drop=(), change=None, extra=None):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if k in drop:
            continue
        v = change(k, v) if change else v
        out[rename(k) if rename else k] = v
    out.update(extra or {})
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    return dst


@pytest.mark.parametrize("prefix", ["language_model.", "model.language_model."])
def test_multimodal_names_load(saved, tmp_path, prefix):
    d, ids, ref = saved

    def rename(k):
        if prefix == "language_model.":
            return "language_model." + k
        return k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k

    mm = _copy_with(d, tmp_path / "mm", rename=rename, extra={"vision_tower.patch_conv.weight": np.zeros((2, 3), np.float32)})
    assert_logits_close(ref, mistral4_jax.load(mm).logits(ids))


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model(TINY, seed=6)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    ids = np.arange(10)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert_logits_close(ref, mistral4_jax.load(tmp_path).logits(ids))


def test_missing_unexpected_and_misshaped_tensors(saved, tmp_path):
    d, _, _ = saved
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        mistral4_jax.load(_copy_with(d, tmp_path / "a", drop={name}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.2.input_layernorm.weight'.*2 layers"):
        mistral4_jax.load(_copy_with(d, tmp_path / "b", extra={"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(64, 16\), expected \(96, 16\)"):
        mistral4_jax.load(_copy_with(d, tmp_path / "c", change=lambda k, v: v[:64] if k == name else v))
    with pytest.raises(ValueError, match="unsupported dtype int32"):
        mistral4_jax.load(_copy_with(d, tmp_path / "e", change=lambda k, v: v.astype(np.int32) if k == name else v))


def test_pickle_weights_are_refused_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    # a pickle that would run code if it were ever unpickled
    (tmp_path / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned_m4'\ntR.")
    with pytest.raises(ValueError, match="pickle weights found.*refused"):
        mistral4_jax.load(tmp_path)
    assert not os.path.exists("/tmp/pwned_m4")


def test_corrupt_safetensors_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length 1000000000 is larger than the file"):
        mistral4_jax.load(tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated file: tensor 'w'"):
        mistral4_jax.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        mistral4_jax.load(tmp_path / "nope")
