"""Configs beyond the released one that transformers' Mistral 4 runs: every parameter-free `hidden_act` of
`ACT2FN`, and the rope types of `ROPE_INIT_FUNCTIONS` it can run (linear, dynamic NTK, llama3, longrope,
proportional, yarn with an explicit attention factor), against transformers; and what it cannot run."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.activations import ACT2CLS, ACT2FN
from transformers.models.mistral4 import modeling_mistral4 as ref

import mistral4_jax
from mistral4_jax import Mistral4Config
from mistral4_jax import model as M
from mistral4_jax.activations import ACTIVATIONS, LEARNED
from helpers import TINY, assert_logits_close, hf_config, make_hf_model, save_hf

LONGROPE = dict(rope_type="longrope", rope_short_factor=(1.0, 1.3, 2.0, 3.5), rope_long_factor=(1.0, 2.5, 6.0, 20.0),
                rope_factor=4.0)
ROPES = {
    "linear": dict(rope_type="linear", rope_factor=4.0),
    "dynamic": dict(rope_type="dynamic", rope_factor=4.0, max_position_embeddings=12),
    "llama3": dict(rope_type="llama3", rope_factor=8.0, original_max_position_embeddings=64,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
    "longrope": LONGROPE,
    "proportional": dict(rope_type="proportional", rope_factor=2.0, qk_nope_head_dim=0, partial_rotary_factor=0.5),
    "yarn_attention_factor": dict(rope_attention_factor=0.8, original_max_position_embeddings=4, rope_factor=8.0),
}
"""Rope variants of TINY (qk_rope_head_dim 8: frequencies 1, 0.1, 0.01, 0.001 before scaling)."""

MODELS = {
    "gelu_dense_linear_rope": dict(hidden_act="gelu", first_k_dense_replace=1, **ROPES["linear"]),
    "gelu_tanh_dense_llama3": dict(hidden_act="gelu_pytorch_tanh", first_k_dense_replace=1, **ROPES["llama3"]),
    "longrope_long": dict(LONGROPE, original_max_position_embeddings=16, num_hidden_layers=1),  # 24 > 16: long
    "proportional": dict(ROPES["proportional"], num_hidden_layers=1),
}
"""End-to-end variants: each activation runs in the dense MLP, the shared expert and the routed experts."""

DYNAMIC = TINY.replace(**ROPES["dynamic"], original_max_position_embeddings=4, num_hidden_layers=1)  # NTK from 13 on


def test_every_parameter_free_activation_matches_transformers():
    assert set(ACTIVATIONS) == set(ACT2CLS) - set(LEARNED)
    x = np.concatenate([np.linspace(-30, 30, 2001), np.linspace(-3, 3, 999)]).astype(np.float32)
    for name, fn in ACTIVATIONS.items():
        want = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), want, rtol=2e-6, atol=2e-6, err_msg=name)


def _hf_cos_sin(cfg: Mistral4Config, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' cos/sin [B, T, R/2] from a fresh rotary embedding (its dynamic state starts unscaled)."""
    rot = ref.Mistral4RotaryEmbedding(hf_config(cfg))
    cos, sin = rot(torch.zeros(1), torch.tensor(pos))
    half = cfg.qk_rope_head_dim // 2
    return cos[..., :half].numpy(), sin[..., :half].numpy()


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("length", [9, 40])
def test_rope_cos_sin_match_transformers(rope, length):
    """Per call, dynamic and longrope take the length from the largest position (one row per call here:
    transformers uses the batch's largest, we each row's own)."""
    cfg = TINY.replace(**ROPES[rope])
    pos = np.arange(length)[None] + np.array([[0], [3]])
    for row in pos:
        cos, sin = M.rope_cos_sin(cfg, jnp.asarray(row[None]), jnp.asarray([row.max() + 1]))
        want_cos, want_sin = _hf_cos_sin(cfg, row[None])
        np.testing.assert_allclose(np.asarray(cos), want_cos, atol=2e-6, err_msg=rope)
        np.testing.assert_allclose(np.asarray(sin), want_sin, atol=2e-6, err_msg=rope)
    # the HF config dict round-trips, and the attention softmax scale is transformers'
    assert Mistral4Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    attn = ref.Mistral4Attention(hf_config(cfg), 0)
    assert cfg.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_logits_match_transformers(variant, tmp_path):
    cfg = TINY.replace(**MODELS[variant])
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 24))
    hf = make_hf_model(cfg)
    save_hf(hf, str(tmp_path))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    model = mistral4_jax.load(tmp_path)
    assert model.config.hidden_act == cfg.hidden_act and model.config.rope_type == cfg.rope_type
    assert_logits_close(want, np.asarray(model.logits(ids)))


# ------------------------------------------------------------------------------------ dynamic NTK rope
@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    """(transformers model, our model) for DYNAMIC (max_position_embeddings 12: scaling from 13 tokens)."""
    d = tmp_path_factory.mktemp("dynamic")
    hf = make_hf_model(DYNAMIC, seed=4)
    save_hf(hf, str(d))
    return hf, mistral4_jax.load(d)


def _fresh(hf: transformers.Mistral4ForCausalLM, fn, *args, **kwargs):
    """Call `fn` as a fresh transformers model would: its dynamic rope keeps the frequencies of the longest
    sequence it has seen until a call shorter than max_position_embeddings, so reset them first."""
    rot = hf.model.rotary_emb
    rot.inv_freq = rot.original_inv_freq.clone()
    rot.max_seq_len_cached = rot.original_max_seq_len
    with torch.no_grad():
        return fn(*args, **kwargs)


def test_dynamic_rope_prefill_and_decode_match_transformers(dynamic):
    """A 14-token prompt (past max_position_embeddings 12) gives transformers' logits at every position;
    then, as transformers' generate recomputes the frequencies at every step from the current length and
    keeps the keys cached as they were rotated, our absorbed decode over the latent cache gives its logits
    at every step."""
    hf, model = dynamic
    never = DYNAMIC.vocab_size - 1
    prompt = np.random.default_rng(3).integers(3, DYNAMIC.vocab_size, size=14)
    want = _fresh(hf, hf, torch.tensor(prompt[None])).logits[0].numpy()
    plain = _fresh(hf, hf, torch.tensor(prompt[None, :12])).logits[0].numpy()
    assert not np.allclose(plain, want[:12], atol=1e-3)  # the frequencies do change past 12 tokens
    out = _fresh(hf, hf.generate, torch.tensor(prompt[None]), max_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True, eos_token_id=never, pad_token_id=0)
    seq = out.sequences[0].numpy()
    steps = np.stack([s[0].numpy() for s in out.logits[1:]])  # after each new token but the last

    apply = jax.jit(model.apply, static_argnames=("decode",))
    t0, s = len(prompt), len(seq)
    cache = M.init_cache(DYNAMIC, 1, s)
    pos = np.arange(s)[None]
    logits, _, cache = apply(model.params, seq[None, :t0], pos[:, :t0], jnp.ones((1, t0), bool), cache=cache)
    assert_logits_close(want, np.asarray(logits[0]))
    ours = []
    for i in range(t0, s - 1):
        logits, _, cache = apply(model.params, seq[None, i:i + 1], pos[:, i:i + 1], jnp.ones((1, 1), bool),
                                 cache=cache, index=i, decode=True)
        ours.append(np.asarray(logits[0, 0]))
    assert_logits_close(steps, np.stack(ours))


def test_dynamic_rope_generate_matches_transformers(dynamic):
    """Our batched generate (left padded, bucketed, past max_position_embeddings) gives transformers'
    greedy tokens for each prompt generated alone (transformers takes the length of a batch from its
    longest row; ours are each row's own, so a row does not depend on its batch)."""
    hf, model = dynamic
    never = DYNAMIC.vocab_size - 1
    prompts = [np.random.default_rng(n).integers(3, DYNAMIC.vocab_size, size=n).tolist() for n in (5, 9, 14)]
    got = model.generate(prompts, max_new_tokens=16, stop_token_ids=[never])
    for p, g in zip(prompts, got):
        want = _fresh(hf, hf.generate, torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=never,
                   pad_token_id=0)
        assert g.tokens == want[0, len(p):].tolist(), (len(p), g.tokens)


# ------------------------------------------------------------------------------------------- refused
def _runs_in_transformers(d: dict) -> bool:
    try:
        hf = transformers.Mistral4ForCausalLM(transformers.Mistral4Config(**d)).eval()
        with torch.no_grad():
            hf(torch.arange(6)[None])
        return True
    except (RuntimeError, KeyError, TypeError):
        return False


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "proportional", "factor": 2.0}, "needs qk_nope_head_dim 0"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0}, "partial_rotary_factor"),
    ({"rope_type": "dynamic_yarn", "factor": 2.0}, "rope_type"),
])
def test_what_transformers_cannot_run_is_refused(rope, field):
    d = TINY.to_hf_dict()
    d["rope_parameters"] = {**rope, "rope_theta": 1e4, "llama_4_scaling_beta": 0.1, "original_max_position_embeddings": 16}
    assert not _runs_in_transformers(copy.deepcopy(d))
    with pytest.raises(ValueError, match=field):
        Mistral4Config.from_hf_dict(d)
