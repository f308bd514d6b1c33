"""`plan.memory_plan` against parameter and cache sizes worked out here from the config fields alone
(the HF Mistral 4 / DeepSeek-V3 module shapes) and the layout the README describes: experts over
`expert`, heads, vocabulary and FFN width over `tensor`, the cache batch over `data` and its slots over `expert`
(each where that axis divides them), the rest replicated."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from mistral4_jax import Mistral4Config, configs
from mistral4_jax.plan.memory import GiB, format_plan, max_context, memory_plan
from mistral4_jax.sharding import DEFAULT_RULES
from helpers import TINY, expected_params, make_hf_model

MESH = {"data": 2, "expert": 4, "tensor": 2}
CFG = TINY.replace(num_hidden_layers=3, first_k_dense_replace=1)  # one dense layer, two MoE layers


def kv_bytes_per_token(c: Mistral4Config, itemsize: int) -> int:
    return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * itemsize


def test_weights_and_cache_per_device():
    params, per_device = expected_params(CFG, MESH)
    assert params == sum(w.numel() for w in make_hf_model(CFG).parameters())  # the count is transformers' too
    p = memory_plan(CFG, MESH, jnp.bfloat16, batch=4, context=64)
    assert (p.params, p.weight_bytes_total, p.weight_bytes_per_device) == (params, 2 * params, 2 * per_device)
    assert (p.dtype, p.cache_dtype) == ("bfloat16", "bfloat16")
    kv = kv_bytes_per_token(CFG, 2)
    assert p.kv_bytes_per_token == kv
    assert p.kv_bytes_per_device == 4 * 64 * kv // (2 * 4)  # the batch split over data=2, the slots over expert=4
    assert memory_plan(CFG, MESH, jnp.bfloat16, batch=3, context=64).kv_bytes_per_device == 3 * 64 * kv // 4  # 3 rows do not split
    assert memory_plan(CFG, MESH, jnp.bfloat16, batch=4, context=66).kv_bytes_per_device == 4 * 66 * kv // 2  # nor 66 slots
    assert p.hbm_per_device is p.fits is p.max_tokens_per_device is None
    f32 = memory_plan(CFG, MESH, jnp.float32, batch=4, context=64)
    assert (f32.weight_bytes_per_device, f32.kv_bytes_per_token, f32.cache_dtype) == (4 * per_device, kv_bytes_per_token(CFG, 4), "float32")
    assert memory_plan(CFG, MESH, jnp.float32, cache_dtype=jnp.bfloat16).kv_bytes_per_token == kv


def test_fits_at_the_boundary():
    """reserve 0.5: half of the memory is left for activations; the rest holds the weights and the cache."""
    p = memory_plan(CFG, MESH, jnp.bfloat16, batch=4, context=64)
    need = p.weight_bytes_per_device + p.kv_bytes_per_device
    exact = memory_plan(CFG, MESH, jnp.bfloat16, batch=4, context=64, hbm_per_device=2 * need, reserve=0.5)
    assert exact.fits is True and exact.max_tokens_per_device == 4 * 64  # every slot of the cache, over both data rows
    short = memory_plan(CFG, MESH, jnp.bfloat16, batch=4, context=64, hbm_per_device=2 * need - 2, reserve=0.5)
    assert short.fits is False and short.max_tokens_per_device == 4 * 60  # 4 slots (one per expert shard) less
    none = memory_plan(CFG, MESH, jnp.bfloat16, hbm_per_device=p.weight_bytes_per_device, reserve=0.5)
    assert none.fits is False and none.max_tokens_per_device == 0


def test_largest_context_per_batch_size():
    """Reserve 0.5 of 2 x (weights + 1000 tokens' cache) leaves 1,000 tokens' cache per device: S x B / rows x kv / 4
    <= 1000 kv, rows = 2 when data=2 divides the batch; S a multiple of 4 (the expert split)."""
    weights = memory_plan(CFG, MESH, jnp.bfloat16).weight_bytes_per_device
    hbm = 2 * (weights + 1000 * kv_bytes_per_token(CFG, 2))
    assert max_context(CFG, MESH, jnp.bfloat16, None, hbm, batches=(1, 2, 3, 8), reserve=0.5) == {
        1: 4000, 2: 4000, 3: 1332, 8: 1000}
    unsplit = DEFAULT_RULES.replace(cache_seq=None)
    assert max_context(CFG, MESH, jnp.bfloat16, None, hbm, batches=(1, 3), reserve=0.5, rules=unsplit) == {
        1: 1000, 3: 333}
    p = memory_plan(CFG, MESH, jnp.bfloat16, hbm_per_device=hbm, reserve=0.5)
    assert p.max_context == {1: 4000, 8: 1000, 32: 248, 128: 60} and p.window == CFG.max_position_embeddings
    text = format_plan(p)
    assert "batch    1          4,000 tokens  (0% of the 1,048,576-token window)" in text
    assert memory_plan(CFG, MESH, jnp.bfloat16).max_context is None


def test_real_model():
    real = Mistral4Config.from_json(configs.resolve("mistral-small-4-119b"))
    params, per_device = expected_params(real, {"data": 1, "expert": 8, "tensor": 2})
    p = memory_plan(real, {"expert": 8, "tensor": 2}, jnp.bfloat16, batch=1, context=8192)
    assert 118.5e9 < p.params == params < 119.5e9  # Mistral-Small-4-119B
    assert p.weight_bytes_per_device == 2 * per_device
    assert p.kv_bytes_per_token == 36 * (256 + 64) * 2
    fp8 = memory_plan(real, {"expert": 8, "tensor": 2}, jnp.float8_e4m3fn, batch=1, context=8192)
    assert fp8.params == params and fp8.cache_dtype == "bfloat16"  # FP8 scales are not parameters
    assert p.weight_bytes_per_device / 2 < fp8.weight_bytes_per_device < p.weight_bytes_per_device
    # v5e-16 (16 GiB per chip), FP8: the cache's slots over expert=8 -> 2,880 bytes per token per chip
    free = 0.9 * 16 * GiB - fp8.weight_bytes_per_device
    contexts = max_context(real, {"expert": 8, "tensor": 2}, jnp.float8_e4m3fn, None, 16 * GiB, batches=(1, 8))
    assert contexts == {b: int(free // (b * 8 * 2880)) * 8 for b in (1, 8)}
    assert contexts[1] >= real.max_position_embeddings and contexts[8] >= 65_536


def test_a_mesh_that_does_not_divide_is_refused():
    with pytest.raises(ValueError):
        memory_plan(CFG, {"expert": 3})  # 8 experts over 3 devices


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_train_plan_counts_what_training_trains(dtype):
    """`plan --train`'s trained arrays are those `init_trainable` makes (float32), the experts' factors split over
    `expert` like the experts, the AdamW moments and gradients twice them each."""
    import jax

    from mistral4_jax import model as M
    from mistral4_jax.plan.train import train_memory
    from mistral4_jax.train.step import TrainSpec, init_trainable

    spec = TrainSpec(lora_rank=4, lora_targets=("attn", "experts"), train_params=("*norm*",))
    trainable = init_trainable(M.init_params(CFG, jax.random.key(0), jnp.dtype(dtype)), spec)
    sizes = {name: sum(x.size for x in jax.tree.leaves(t)) for name, t in trainable.items()}
    experts = sum(n for name, n in sizes.items() if "experts_" in name)
    one = train_memory(CFG, {"data": 1, "expert": 1, "tensor": 1}, jnp.dtype(dtype), spec, 1, 64)
    assert one.trainable_params == sum(sizes.values()) and one.trainable == 4 * sum(sizes.values())
    assert one.grads == one.optimizer == 2 * one.trainable
    split = train_memory(CFG, {"data": 1, "expert": 2, "tensor": 1}, jnp.dtype(dtype), spec, 1, 64)
    assert split.trainable == 4 * (sum(sizes.values()) - experts) + 4 * experts // 2
