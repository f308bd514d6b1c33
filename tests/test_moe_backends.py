"""The routed experts' backends: "ragged" (static shapes, what TPU/GPU run) forced on CPU gives the logits
and tokens of transformers and of the "loop" backend (the CPU's), unsharded, on 8 simulated devices, with
float32 and with FP8 weights."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral4_jax
from mistral4_jax import Mistral4, sharding
from mistral4_jax.weights import checkpoint, hf
from mistral4_jax.weights.quant import QuantArray
from mistral4_jax.convert import convert
from mistral4_jax.model import resolve_moe_backend, routed_experts
from mistral4_jax.sharding import make_mesh
from helpers import TINY, assert_logits_close, hf_greedy_batch, make_hf_model, router_choices, save_hf

import torch

CFG = TINY.replace(first_k_dense_replace=1, num_hidden_layers=3)
NEVER = CFG.vocab_size - 1  # a stop token that greedy decoding never meets here


# ------------------------------------------------------------------------------------------- kernel
def _dense(x, ids, w, gate, up, down, scales):
    """numpy: every token through each of its chosen experts (dequantised), weighted; ids outside
    0..E-1 contribute nothing."""
    out = np.zeros_like(x)
    for ti in range(ids.shape[0]):
        for ki in range(ids.shape[1]):
            e = ids[ti, ki]
            if not 0 <= e < gate.shape[0]:
                continue
            g, u, d = (m[e] * s[e] for m, s in zip((gate, up, down), scales))
            h = x[ti] @ g
            out[ti] += w[ti, ki] * ((h / (1 + np.exp(-h))) * (x[ti] @ u)) @ d
    return out


KERNEL_CASES = {  # name: (tokens, rows per grouped matmul, routing, first expert held, primitive expected,
    #                      weights stacked over 3 layers (this is layer 1))
    "decode_1_token": (1, None, "spread", 0, "cond", False),
    "decode_1_token_layer_of_a_stack": (1, None, "spread", 0, "cond", True),
    "decode_2_tokens_on_a_shard": (2, None, "spread", 4, "cond", False),
    "decode_more_copies_than_experts": (24, None, "spread", 0, "cond", True),
    "prefill_one_call": (80, None, "spread", 0, "ragged_dot", False),
    "prefill_one_call_layer_of_a_stack": (80, None, "spread", 0, "ragged_dot", True),
    "prefill_chunks_on_a_shard": (80, 8, "spread", 4, "ragged_dot", False),
    "prefill_chunks_imbalanced": (80, 8, "two_experts", 0, "ragged_dot", False),
}


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_ragged_kernels_match_dense_experts(case):
    """FP8-style per-expert scales, a shard holding experts 4..7 of 8 (others' copies must vanish), and
    a grouped matmul of 8 rows looping over several chunks, balanced or all copies on two experts; weights
    stacked over layers (a layer scan's) with the layer given."""
    t, rows, routing, first, primitive, stacked = KERNEL_CASES[case]
    assert (primitive == "cond") == (t <= mistral4_jax.model.moe.GATHER_MAX_TOKENS)
    rng = np.random.default_rng(len(case))
    e, k, d, f = 8, 2, 16, 8
    held = e if first == 0 else 4
    x = rng.normal(size=(t, d)).astype(np.float32)
    gate, up = (rng.normal(size=(held, d, f)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(held, f, d)).astype(np.float32)
    scales = tuple(rng.uniform(0.5, 2.0, size=(held, 1, 1)).astype(np.float32) for _ in range(3))
    w = rng.uniform(size=(t, k)).astype(np.float32)
    if routing == "two_experts":
        ids = np.tile([[3, 5]], (t, 1))
    else:
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    ids = ids.astype(np.int32)

    def run(x, ids, w, gate, up, down, scales):
        gate, up, down = (QuantArray(m, s) for m, s in zip((gate, up, down), scales))
        layer = None
        if stacked:  # layers 0 and 2 are another layer's weights: they must not leak in
            gate, up, down = (jax.tree.map(lambda a: jnp.stack([a[::-1], a, 2 * a]), m) for m in (gate, up, down))
            layer = jnp.int32(1)
        return routed_experts(x, ids, w, gate, up, down, first_expert=first, backend="ragged", rows=rows, layer=layer)

    assert primitive in str(jax.make_jaxpr(run)(x, ids, w, gate, up, down, scales))
    got = jax.jit(run)(x, ids, w, gate, up, down, scales)
    want = _dense(x, ids - first, w, gate, up, down, scales)
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_backend_choice():
    assert resolve_moe_backend("auto") == "loop"  # tests run on CPU
    assert resolve_moe_backend("ragged") == "ragged"
    tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
    assert resolve_moe_backend("auto", tpu) == "ragged"
    assert resolve_moe_backend("loop", tpu) == "loop"
    with pytest.raises(ValueError, match="moe_backend must be one of auto, loop, ragged, got 'grouped'"):
        Mistral4(CFG, None, moe_backend="grouped")


# ------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny HF model saved and converted to FP8; its logits, router choices and greedy tokens
    (2 prompts in one batch, and the first alone)."""
    d = str(tmp_path_factory.mktemp("hf"))
    model = make_hf_model(CFG, seed=5)
    save_hf(model, d)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, CFG.vocab_size, size=(2, 24))
    records, remove = router_choices(model)
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.numpy()
    remove()
    prompts = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (5, 11)]
    tokens = {n: hf_greedy_batch(model, prompts[:n], 12, NEVER, CFG.pad_token_id) for n in (1, 2)}
    fp8 = convert(d, str(tmp_path_factory.mktemp("fp8") / "ckpt"), dtype="float8_e4m3fn", progress=False)
    return {"params": hf.read_params(d, CFG), "ids": ids, "logits": logits, "experts": records,
            "prompts": prompts, "tokens": tokens, "fp8": fp8}


def _check_model(model, ref, prompts: int) -> np.ndarray:
    """Logits and chosen experts of a [2, 24] prefill, and 12 greedy tokens for the first `prompts`
    prompts in one batch, against transformers; returns the logits."""
    logits, experts = model.forward(ref["ids"])
    assert_logits_close(ref["logits"], np.asarray(logits))
    for layer, rec in enumerate(ref["experts"]):
        np.testing.assert_array_equal(np.sort(np.asarray(experts[layer]).reshape(-1, CFG.num_experts_per_tok), -1),
                                      np.sort(rec, -1))
    got = [r.tokens for r in model.generate(ref["prompts"][:prompts], max_new_tokens=12, stop_token_ids=[NEVER])]
    assert got == ref["tokens"][prompts]
    return np.asarray(logits)


def test_ragged_backend_matches_transformers_and_loop(reference, monkeypatch):
    """One device: prefill of 48 tokens (grouped matmuls, forced below their usual token count), decode steps
    of 2 tokens (4 copies <= 8 experts: the sliced experts)."""
    monkeypatch.setattr(mistral4_jax.model.moe, "GATHER_MAX_TOKENS", 0)
    model = Mistral4(CFG, reference["params"], moe_backend="ragged")
    ours = _check_model(model, reference, prompts=2)
    loop = Mistral4(CFG, reference["params"], moe_backend="loop")
    np.testing.assert_allclose(ours, np.asarray(loop.forward(reference["ids"])[0]), atol=1e-5, rtol=0)


def test_ragged_backend_expert_parallel_matches_transformers(reference, monkeypatch):
    """expert=4 x tensor=2: prefill grouped matmuls of 0.3x a shard's even share of the copies (the chunk
    loop runs several times under shard_map); decode of one prompt: 2 copies <= 2 experts per shard."""
    monkeypatch.setattr(mistral4_jax.model.moe, "EXPERT_ROWS_SLACK", 0.3)
    monkeypatch.setattr(mistral4_jax.model.moe, "GATHER_MAX_TOKENS", 0)
    model = Mistral4(CFG, reference["params"], mesh=make_mesh("data=1,expert=4,tensor=2"), moe_backend="ragged")
    _check_model(model, reference, prompts=1)


def test_ragged_backend_with_fp8_weights_on_a_mesh(reference, monkeypatch):
    """FP8 weights with per-expert scales (float32 compute), expert=4 x tensor=2, the 48-token prefill through
    grouped matmuls (the sliced experts' FP8 path: the kernel cases and test_variants): the logits of the same
    checkpoint dequantised to float32 on one device."""
    monkeypatch.setattr(mistral4_jax.model.moe, "GATHER_MAX_TOKENS", 0)
    _, dequantised = checkpoint.restore_params(reference["fp8"], "float32")
    want = Mistral4(CFG, dequantised).logits(reference["ids"])
    scales = np.asarray(checkpoint.restore_params(reference["fp8"])[1]["layers_moe"]["moe"]["experts_gate"].scale)
    assert np.unique(scales).size > 1, "per-expert scales should differ"
    model = mistral4_jax.load(reference["fp8"], dtype="float8_e4m3fn", compute_dtype="float32",
                              mesh=make_mesh("data=1,expert=4,tensor=2"), moe_backend="ragged")
    assert model.params["layers_moe"]["moe"]["experts_gate"].dtype == np.dtype("float8_e4m3fn")
    assert_logits_close(want, model.logits(reference["ids"]))
