"""The language-modelling loss and its gradients against transformers' `Mistral4ForCausalLM(labels=...)`:
a tiny random float32 model with dense and MoE layers, right padding and -100 labels; the loss within 1e-5
relative, the gradient of every parameter within 1e-4 relative (transformers' gradients saved in its checkpoint
format and read through the converter's own mapping, so every tensor lands where ours is)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral4_jax
from mistral4_jax import model as M
from mistral4_jax.weights import hf
from helpers import TINY, make_hf_model, save_hf

B, T, PAD = 2, 12, 3
CFG = TINY.replace(first_k_dense_replace=1)  # layer 0 dense, layer 1 MoE


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(3, CFG.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, T - PAD:] = 0  # row 1 right padded
    labels = ids.copy()
    labels[0, :4] = -100  # a prompt that is not learned
    labels[mask == 0] = -100
    return ids, mask, labels


def test_loss_and_gradients_equal_transformers(batch, tmp_path):
    ids, mask, labels = batch
    ref = make_hf_model(CFG, seed=5)
    save_hf(ref, str(tmp_path / "weights"))
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    save_hf(ref, str(tmp_path / "grads"))  # the gradients, in the checkpoint's layout

    params = jax.tree.map(jnp.asarray, hf.read_params(str(tmp_path / "weights"), CFG))
    (loss, tokens), grads = jax.jit(jax.value_and_grad(
        lambda p: M.causal_lm_loss(p, CFG, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(mask)), has_aux=True))(params)
    assert int(tokens) == int((labels[:, 1:] != -100).sum())
    assert float(loss) == pytest.approx(out.loss.item(), rel=1e-5)

    model = mistral4_jax.load(tmp_path / "weights")  # the model object's loss: the same number
    assert model.loss(ids, labels, mask) == pytest.approx((out.loss.item(), int(tokens)), rel=1e-5)
    with pytest.raises(ValueError, match="labels must lie in"):
        model.loss(ids, np.full_like(labels, CFG.vocab_size), mask)

    want = hf.read_params(str(tmp_path / "grads"), CFG)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    checked = 0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        w = flat_want[path]
        scale = max(float(np.abs(w).max()), 1e-8)
        assert float(np.abs(np.asarray(g) - w).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)
        checked += 1
    assert checked == len(flat_want) and all(float(np.abs(w).max()) > 0 for w in flat_want.values() if w.size > 0)


def test_cross_entropy_counts_only_labelled_tokens():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 7)), jnp.float32)
    loss, tokens = M.cross_entropy(logits, jnp.asarray([[5, -100, 2, 6]]))
    log_p = jax.nn.log_softmax(logits[0], axis=-1)
    assert int(tokens) == 2 and float(loss) == pytest.approx(-float(log_p[1, 2] + log_p[2, 6]) / 2, rel=1e-6)
    none, zero = M.cross_entropy(logits, jnp.full((1, 4), -100))
    assert int(zero) == 0 and float(none) == 0.0
