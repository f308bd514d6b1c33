"""Restoring a converted checkpoint onto meshes of 2 and 4 (simulated) devices, whatever wrote it.

Uses the 8 simulated CPU devices that conftest.py configures. Every restored array must carry exactly
its target sharding (each device holding only its shard) and the values of a single-device restore.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import mistral4_jax
from mistral4_jax import sharding
from mistral4_jax.weights import checkpoint
from mistral4_jax.convert import convert
from helpers import TINY, make_hf_model, save_hf

CFG = TINY.replace(num_hidden_layers=3, first_k_dense_replace=1)


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    n = int(np.prod(shape))
    assert jax.device_count() >= n, "conftest.py should give 8 simulated CPU devices"
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=jax.devices()[:n])


def by_rules(m: jax.sharding.Mesh, rules: dict[str, str]):
    """A `shardings` callable: each logical axis onto its mesh axis where that divides the dimension
    (and the mesh axis is not used twice in one array)."""

    def shard(axes: tuple[str | None, ...], leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        spec, used = [], set()
        for name, dim in zip(axes, leaf.shape):
            axis = rules.get(name)
            ok = axis is not None and axis not in used and dim % m.shape[axis] == 0
            spec.append(axis if ok else None)
            used.add(axis if ok else None)
        return NamedSharding(m, PartitionSpec(*spec))

    return shard


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint converted to bfloat16 and to float8_e4m3fn (on one device, unsharded)."""
    src = save_hf(make_hf_model(CFG, seed=3), str(tmp_path_factory.mktemp("hf")))
    out = tmp_path_factory.mktemp("out")
    return {dtype: convert(src, str(out / dtype), dtype=dtype, progress=False) for dtype in ("bfloat16", "float8_e4m3fn")}


def _check(params: dict, reference: dict, targets: dict) -> None:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    ref = jax.tree_util.tree_leaves(reference)
    tgt = jax.tree_util.tree_leaves(targets, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    assert len(flat) == len(ref) == len(tgt)
    for (path, x), r, t in zip(flat, ref, tgt):
        name = jax.tree_util.keystr(path)
        assert x.sharding.is_equivalent_to(t, x.ndim), (name, x.sharding, t)
        for shard in x.addressable_shards:
            assert shard.data.shape == t.shard_shape(x.shape), name
        assert x.dtype == r.dtype and np.array_equal(np.asarray(x), np.asarray(r)), name


CASES = {
    "2 devices: experts, heads, vocab": ((2,), ("x",), {"experts": "x", "heads": "x", "vocab": "x", "mlp": "x"}),
    "4 devices: layer axis too": ((2, 2), ("x", "y"), {"layers": "y", "experts": "x", "heads": "x", "expert_mlp": "y",
                                                     "vocab": "y", "embed": "x"}),
}


@pytest.mark.parametrize("case, dtype, read_as", [
    ("2 devices: experts, heads, vocab", "bfloat16", None),
    ("2 devices: experts, heads, vocab", "float8_e4m3fn", "bfloat16"),
    ("4 devices: layer axis too", "bfloat16", None),
    ("4 devices: layer axis too", "float8_e4m3fn", None),
])
def test_restore_onto_mesh(ckpts, case, dtype, read_as):
    shape, names, rules = CASES[case]
    m = mesh(shape, names)
    _, single = checkpoint.restore_params(ckpts[dtype], read_as)
    _, params = checkpoint.restore_params(ckpts[dtype], read_as, shardings=by_rules(m, rules))
    target_dtype = jax.numpy.dtype(read_as or dtype)
    abstract = mistral4_jax.model.abstract_params(CFG, target_dtype)
    targets = checkpoint.resolve_shardings(by_rules(m, rules), CFG, target_dtype, abstract)
    assert any(not s.is_fully_replicated for s in jax.tree_util.tree_leaves(targets))
    _check(params, single, targets)


def test_load_onto_mesh_uses_the_rules_table(ckpts):
    """`load(path, mesh=...)` restores straight into `sharding.DEFAULT_RULES`' layout (the forward on a mesh is
    tested in test_sharding.py)."""
    m = sharding.make_mesh("data=1,expert=2,tensor=2", jax.devices()[:4])
    model = mistral4_jax.load(ckpts["float8_e4m3fn"], dtype="float8_e4m3fn", mesh=m)
    targets = mistral4_jax.model.param_shardings(CFG, m, jax.numpy.float8_e4m3fn)
    _check(model.params, checkpoint.restore_params(ckpts["float8_e4m3fn"])[1], targets)


def test_load_keeps_the_given_shardings(ckpts):
    """`load(path, mesh=, shardings=)`: the parameters stay where `shardings` puts them (not re-sharded by
    the rules), and the logits are those of the rules' layout."""
    m = sharding.make_mesh("data=1,expert=2,tensor=2", jax.devices()[:4])
    everywhere = NamedSharding(m, PartitionSpec())
    model = mistral4_jax.load(ckpts["bfloat16"], mesh=m, shardings=everywhere)
    moe = model.params["layers_moe"]
    for x in (moe["moe"]["experts_gate"], moe["attn"]["q_b_proj"], model.params["embed"]):
        assert x.sharding.is_equivalent_to(everywhere, x.ndim), x.sharding
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 7))
    ruled = mistral4_jax.load(ckpts["bfloat16"], mesh=m)
    assert not ruled.params["layers_moe"]["moe"]["experts_gate"].sharding.is_fully_replicated
    np.testing.assert_allclose(model.logits(ids), ruled.logits(ids), atol=1e-5, rtol=0)
