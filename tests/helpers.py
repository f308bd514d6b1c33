"""Test helpers: tiny random HF reference models (transformers, float32) and logit comparisons."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import transformers

import mistral4_jax
from mistral4_jax import Mistral4Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Mistral4Config.from_json(os.path.join(REPO, "configs", "tiny.json"))

LOGIT_ATOL = 1e-3
KL_MAX = 1e-5


def hf_config(cfg: Mistral4Config, **extra: Any) -> transformers.Mistral4Config:
    d = cfg.to_hf_dict()
    d.update(initializer_range=0.1, **extra)
    return transformers.Mistral4Config(**d)


def make_hf_model(cfg: Mistral4Config, seed: int = 0) -> transformers.Mistral4ForCausalLM:
    """A random float32 Mistral4ForCausalLM for `cfg`, with norms perturbed so their weights matter."""
    torch.manual_seed(seed)
    model = transformers.Mistral4ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_hf(model: transformers.PreTrainedModel, directory: str) -> str:
    model.save_pretrained(directory)
    return directory


def hf_and_model(cfg: Mistral4Config, seed: int, directory: Any) -> tuple[transformers.Mistral4ForCausalLM, Any]:
    """(a random transformers model for `cfg`, it saved to `directory` and loaded by mistral4_jax)."""
    hf = make_hf_model(cfg, seed)
    save_hf(hf, str(directory))
    return hf, mistral4_jax.load(directory)


def hf_greedy_batch(hf: transformers.PreTrainedModel, prompts: list[list[int]], new_tokens: int, eos: int,
                    pad: int) -> list[list[int]]:
    """transformers' batched greedy generate with left padding (its position ids follow the mask):
    the new tokens of every row."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad)
    return [row[t:].tolist() for row in out]


def router_choices(model: transformers.Mistral4ForCausalLM) -> tuple[list, Any]:
    """Register hooks that record each MoE router's top-k expert ids; returns (records, remove_fn)."""
    records: list[np.ndarray] = []
    handles = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(gate, "top_k"):
            handles.append(gate.register_forward_hook(lambda m, i, o: records.append(o[2].detach().numpy())))
    return records, lambda: [h.remove() for h in handles]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_per_token(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_ours) for each position: [..., vocab] -> [...]."""
    lr, lo = log_softmax(ref), log_softmax(ours)
    return (np.exp(lr) * (lr - lo)).sum(-1)


def assert_logits_close(ref: np.ndarray, ours: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Per token: max |Δlogit| ≤ 1e-3 and KL(p_ref || p_ours) ≤ 1e-5 (only where `valid`)."""
    assert ref.shape == ours.shape, (ref.shape, ours.shape)
    if valid is not None:
        ref, ours = ref[valid.astype(bool)], ours[valid.astype(bool)]
    diff = np.abs(ref - ours).max(-1)
    kl = kl_per_token(ref, ours)
    assert diff.max() <= LOGIT_ATOL, f"max |Δlogit| {diff.max():.3g} > {LOGIT_ATOL} (token {int(diff.argmax())})"
    assert kl.max() <= KL_MAX, f"max KL {kl.max():.3g} > {KL_MAX}"
    assert np.abs(ref).max() > 0.1, "reference logits are ~0: the comparison would be vacuous"


def expected_params(c: Mistral4Config, mesh: dict[str, int]) -> tuple[int, int]:
    """(parameters, parameters held by one device of `mesh`), counted from the config fields alone (HF
    Mistral 4's modules) and the layout the README describes: experts over `expert`; heads, vocabulary and
    FFN widths over `tensor`; norms, the low-rank projections and the router replicated."""
    d, h, x, t = c.hidden_size, c.num_attention_heads, mesh["expert"], mesh["tensor"]
    nope, rope, v, lat = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    # attention (MLA): the low-rank query, the latent key/value with its rope part, per-head up-projections
    if c.q_lora_rank:
        q = c.q_lora_rank
        attn_repl, attn_heads = d * q + q, q * h * (nope + rope)  # q_a_proj + its norm; q_b_proj
    else:
        attn_repl, attn_heads = 0, d * h * (nope + rope)  # q_proj
    attn_repl += d * (lat + rope) + lat + 2 * d  # kv_a_proj_with_mqa, its norm, the layer's two norms
    attn_heads += lat * h * (nope + v) + h * v * d  # kv_b_proj (k and v parts), o_proj
    e, f, shared = c.n_routed_experts, c.moe_intermediate_size, c.moe_intermediate_size * c.n_shared_experts
    dense = 3 * d * c.intermediate_size  # gate, up, down
    moe_repl, experts, moe_mlp = d * e, 3 * e * d * f, 3 * d * shared  # router; routed experts; shared expert
    n_dense = c.first_k_dense_replace
    n_moe = c.num_hidden_layers - n_dense
    vocab = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)  # embedding (+ lm_head)
    total = (c.num_hidden_layers * (attn_repl + attn_heads) + n_dense * dense
             + n_moe * (moe_repl + experts + moe_mlp) + vocab + d)
    per_device = (c.num_hidden_layers * (attn_repl + attn_heads // t) + n_dense * dense // t
                  + n_moe * (moe_repl + experts // (x * t) + moe_mlp // t) + vocab // t + d)
    return total, per_device
