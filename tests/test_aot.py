"""Ahead-of-time compilation for TPU without a TPU (`mistral4_jax.plan.compile`, libtpu from the `tpu-aot` extra that
`test` pulls in): the real model's dimensions at reduced depth, compiled for a v5e 2x2 slice."""

import importlib.metadata
import importlib.util
import json
import os

import jax.numpy as jnp
import pytest

from mistral4_jax import Mistral4Config
from mistral4_jax.plan import compile as aot, hlo, targets
from mistral4_jax.cli import main
from mistral4_jax.plan.memory import decode_reads, memory_plan

REAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mistral-small-4-119b.json")
TARGET, MESH, LAYERS, CONTEXT = "v5e:2x2", {"expert": 4}, 1, 262_144


@pytest.fixture(scope="module")
def compiled():
    """Decode B=1 over a 262,144-slot cache and a 16-token prefill chunk, 1 real-size MoE layer, FP8 weights."""
    return aot.compile_plan(REAL, TARGET, mesh=MESH, dtype="float8_e4m3fn", batch=1, context=CONTEXT, chunk=16,
                            layers=LAYERS, layer_loop="unroll")


@pytest.fixture(scope="module")
def cfg():
    real = Mistral4Config.from_json(REAL)
    return real.replace(num_hidden_layers=LAYERS, softmax_scale=real.softmax_scale)


def test_compiled_weights_agree_with_abstract_plan(compiled, cfg):
    plan = memory_plan(cfg, MESH, jnp.float8_e4m3fn, batch=1, context=CONTEXT)
    assert compiled.weight_bytes == pytest.approx(plan.weight_bytes_per_device, rel=0.05)
    assert compiled.plan_weight_bytes == plan.weight_bytes_per_device
    for step in compiled.steps:  # the programs hold the weights, the cache and a little more
        assert step.fits and step.error is None
        assert plan.weight_bytes_per_device + plan.kv_bytes_per_device <= step.argument_bytes <= 1.1 * (
            plan.weight_bytes_per_device + plan.kv_bytes_per_device)
        assert step.total_bytes <= compiled.hbm_bytes == 16 * 1024**3


def test_decode_figures(compiled, cfg):
    decode = compiled.step("decode")
    reads = decode_reads(cfg, MESH, jnp.float8_e4m3fn, batch=1, context=CONTEXT)
    assert (decode.reads_expected, decode.reads_worst) == (reads.expected, reads.worst)
    # the step reads at least the non-expert weights and the cache; top-4 of 128 experts over 4 shards: one
    # expected, at most 4 of the 32 this chip holds
    assert reads.experts_read_expected == pytest.approx(1.0) and reads.experts_read_worst == 4
    assert decode.bytes_accessed >= reads.weights + reads.cache
    # what the step moves through HBM: every byte it must read (the 4 expert slots all taken), and little else
    assert reads.worst <= decode.hbm_bytes <= 1.25 * reads.worst
    # the accelerator MoE backend (`moe_backend` "ragged" on TPU) has static shapes: no loop, so the counts are exact
    assert decode.flops > 0 and decode.cost_exact is True
    # expert parallelism adds each layer's partial outputs with one all-reduce of the token's [1, 4096] bf16; the
    # cache's slots over expert=4 combine their softmax partials with two more (`model.attention`): the 32 heads'
    # max (pmax), then their sums and weighted latents [32, 256] (psum, in one), all f32
    kinds = {c.kind: c for c in decode.collectives}
    assert set(kinds) == {"all-reduce"}
    assert (kinds["all-reduce"].count, kinds["all-reduce"].bytes) == (3 * LAYERS, LAYERS * (4096 * 2 + 2 * 32 * 4 + 32 * 256 * 4))
    bound = max(decode.reads_expected / 819e9, decode.flops / 197e12) * 1e3
    assert decode.roofline_ms == pytest.approx(bound) and decode.tokens_per_s == pytest.approx(1e3 / bound)


def test_prefill_figures(compiled):
    prefill = compiled.step("prefill")
    assert (prefill.batch, prefill.tokens, prefill.context) == (1, 16, CONTEXT)
    assert prefill.reads_expected is None and prefill.flops > 0
    bound = max(prefill.bytes_accessed / 819e9, prefill.flops / 197e12) * 1e3
    assert prefill.roofline_ms == pytest.approx(bound) and prefill.tokens_per_s == pytest.approx(16e3 / bound)


def test_largest_context_from_the_compiled_decode_step(compiled):
    """The cache per chip: 262,144 slots x (256 + 64) bf16 numbers of one layer over expert=4 (the compiled
    arguments less the weights hold it, the `valid` flags, the token and TPU padding: 0.6% more); the rest of
    the step's total is fixed. Per 4 slots (one per expert shard) a batch of B takes B x 640 bytes per chip."""
    decode = compiled.step("decode")
    cache = CONTEXT * (256 + 64) * 2 // 4
    assert cache < decode.argument_bytes - compiled.weight_bytes <= 1.01 * cache
    fixed = decode.total_bytes - cache
    assert compiled.max_context == {b: (16 * 1024**3 - fixed) // (b * 640) * 4 for b in (1, 8)}
    assert compiled.max_context[8] >= CONTEXT and compiled.window == 1_048_576
    assert f"batch    8  {compiled.max_context[8]:>13,} tokens" in aot.format_compiled(compiled)


def test_scanned_decode_reads_only_the_chosen_experts():
    """The program as it runs (layers under `lax.scan`) moves about the bytes a decode step must read: the
    scan must not copy each layer's stacked experts out of the [layers, E, ...] arrays (that copy, 4x the
    must-read bytes, is what the old layout compiled to)."""
    plan = aot.compile_plan(REAL, TARGET, mesh=MESH, dtype="float8_e4m3fn", batch=1, context=4096, layers=2,
                            steps=("decode",), cost=False)
    decode = plan.step("decode")
    assert plan.layer_loop == "scan" and decode.fits
    assert decode.reads_worst <= decode.hbm_bytes <= 1.25 * decode.reads_worst


def test_hbm_bytes_counts_an_in_place_write_that_reads_its_slot():
    """A per-shard scatter of one row lowers to: read the row, select, write it back in place: two rows moved
    (plus the update read), not the whole [8, 1024] buffer."""
    text = """
%fused_write (param_0: f32[8,1024], param_1: s32[], param_2: f32[1,1024], param_3: pred[]) -> f32[8,1024] {
  %param_0 = f32[8,1024]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = f32[1,1024]{1,0} parameter(2)
  %param_3 = pred[] parameter(3)
  %c = s32[] constant(0)
  %old = f32[1,1024]{1,0} dynamic-slice(%param_0, %param_1, %c), dynamic_slice_sizes={1,1024}
  %m = pred[1,1024]{1,0} broadcast(%param_3), dimensions={}
  %new = f32[1,1024]{1,0} select(%m, %param_2, %old)
  ROOT %dus = f32[8,1024]{1,0} dynamic-update-slice(%param_0, %new, %param_1, %c)
}

ENTRY %main (w: f32[8,1024], i: s32[], u: f32[1,1024], k: pred[]) -> f32[8,1024] {
  %w = f32[8,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %u = f32[1,1024]{1,0} parameter(2)
  %k = pred[] parameter(3)
  ROOT %f = f32[8,1024]{1,0} fusion(%w, %i, %u, %k), kind=kLoop, calls=%fused_write
}
"""
    row = 1024 * 4
    assert 3 * row <= hlo.hbm_bytes(text) < 4 * row


def test_hbm_bytes_walks_loops_slices_and_vmem():
    """A 3-trip loop whose body slices one row out of a stacked weight (a fusion) and prefetches a VMEM copy; the
    costlier branch of a conditional."""
    text = """
%fused_slice (param_0: f32[8,1024], param_1: s32[]) -> f32[1,1024] {
  %param_0 = f32[8,1024]{1,0} parameter(0)
  %param_1 = s32[]{:T(128)} parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(%param_0, %param_1, %c), dynamic_slice_sizes={1,1024}
}

%body (p: (s32[], f32[8,1024])) -> (s32[], f32[8,1024]) {
  %p = (s32[], f32[8,1024]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[8,1024]{1,0} get-tuple-element(%p), index=1
  %row = f32[1,1024]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %cs = (f32[8,1024]{1,0}, f32[8,1024]{1,0:S(1)}, u32[]) copy-start(%w)
  %cd = f32[8,1024]{1,0:S(1)} copy-done(%cs)
  %v = f32[8,1024]{1,0:S(1)} add(%cd, %cd)
  ROOT %t = (s32[], f32[8,1024]) tuple(%i, %w)
}

%cond (p: (s32[], f32[8,1024])) -> pred[] {
  %p = (s32[], f32[8,1024]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%big (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  ROOT %y = f32[256]{0} negate(%x)
}

%small (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  ROOT %y = f32[256]{0} bitcast(%x)
}

ENTRY %main (a: (s32[], f32[8,1024]), b: s32[], x: f32[256]) -> f32[256] {
  %a = (s32[], f32[8,1024]) parameter(0)
  %b = s32[] parameter(1)
  %x = f32[256]{0} parameter(2)
  %w = (s32[], f32[8,1024]) while(%a), condition=%cond, body=%body
  ROOT %r = f32[256]{0} conditional(%b, %x, %x), branch_computations={%big, %small}
}
"""
    row, whole, vec, index = 1024 * 4, 8 * 1024 * 4, 256 * 4, 4
    # per trip: the fusion reads one row (and its index) and writes one; the prefetch reads the weight from HBM once; the add
    # works in VMEM. The conditional's costlier branch reads and writes the vector.
    assert hlo.hbm_bytes(text) == 3 * (row + index + row + whole) + 2 * vec


def test_decode_reads_partition_the_weights():
    """At batch 64 on v5e-16 (expert=8, tensor=2) a chip may have to read every expert it holds: the worst case
    reads all its weights except the embedding rows the batch does not use; 1 - (124/128)^64 of them expected."""
    real = Mistral4Config.from_json(REAL)
    mesh = {"expert": 8, "tensor": 2}
    plan = memory_plan(real, mesh, jnp.float8_e4m3fn, batch=64, context=8192)
    reads = decode_reads(real, mesh, jnp.float8_e4m3fn, batch=64, context=8192)
    embed_shard = 131072 * 4096 * 2 // 2
    assert reads.worst == plan.weight_bytes_per_device - embed_shard + 64 * 4096 * 2 + plan.kv_bytes_per_device
    assert reads.experts_read_worst == 16 and reads.experts_read_expected == pytest.approx(16 * (1 - (124 / 128) ** 64))
    one = decode_reads(real, mesh, jnp.float8_e4m3fn, batch=1, context=8192)
    assert (one.experts_read_expected, one.experts_read_worst) == (0.5, 4) and one.weights == reads.weights - 63 * 4096 * 2


def test_too_big_reports_does_not_fit_with_the_figure(capsys):
    """A 134-million-slot cache (36 GiB per chip, its slots split over the 4 chips): the TPU compiler refuses
    the program; the CLI prints one line with the figure."""
    argv = ["plan", "--config", REAL, "--compile", TARGET, "--mesh", "expert=4", "--dtype", "float8_e4m3fn",
            "--layers", "1", "--context", str(2**27), "--steps", "decode", "--no-cost"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    line = [x for x in out if x.startswith("decode")]
    assert len(line) == 1 and "does NOT fit" in line[0] and "RESOURCE_EXHAUSTED" in line[0]
    assert "exceeds available HBM (15.75G)" in line[0]
    assert main(argv + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["steps"][0]["fits"] is False and "RESOURCE_EXHAUSTED" in record["steps"][0]["error"]


def test_parse_targets():
    t = targets.parse_target("v5e-16")
    assert (t.platform, t.chips, t.topology, t.hbm_bytes) == ("tpu", 16, "v5e:4x4", 16 * 1024**3)
    t = targets.parse_target("v5p-8")  # v5p names count TensorCores: 4 chips
    assert (t.chips, t.topology, t.chip_config) == (4, "v5:2x2x1", "megacore")
    assert targets.parse_target("v6e-8").topology == "v6e:2x4" and targets.parse_target("v5e-256").chips == 256
    assert targets.parse_target("v5e:2x2").name == "v5e-4"
    t = targets.parse_target("8xH200")
    assert (t.platform, t.chips, t.topology, t.hbm_bytes, t.hbm_bandwidth) == ("gpu", 8, "1x1x8", 151397597184, 4.8e12)
    assert targets.parse_target("16xH100").topology == "1x2x8"
    assert targets.default_mesh(targets.parse_target("v5e-16"), Mistral4Config.from_json(REAL)) == {"data": 1, "expert": 8, "tensor": 2}


@pytest.mark.parametrize("name", ["v5x-16", "v5e-12", "v5p-6", "v5e:2x2x2", "8xA999", "12xH200", "tpu"])
def test_unknown_target_is_one_line_error(name, capsys):
    assert main(["plan", "--config", REAL, "--compile", name]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown target {name!r}" in err


def test_mesh_must_use_the_targets_chips(capsys):
    with pytest.raises(ValueError, match=r"v5e-4 has 4 chips: .*uses 8 devices"):
        aot.compile_plan(REAL, "v5e-4", mesh="expert=8")
    with pytest.raises(ValueError, match=r"'experts' dimension \(128\) is not divisible by mesh axis expert=256"):
        aot.compile_plan(REAL, "v5e-256", mesh="expert=256")
    assert main(["plan", "--config", REAL, "--compile", "v6e-8", "--mesh", "expert=4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "v6e-8 has 8 chips" in err


def test_missing_or_mismatched_libtpu_names_the_extra(monkeypatch, capsys):
    real_version = importlib.metadata.version

    def missing(name):
        if name == "libtpu":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(targets.importlib.metadata, "version", missing)
    assert main(["plan", "--config", REAL, "--compile", "v5e-4", "--layers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "libtpu, which is not installed" in err and "mistral4-jax[tpu-aot]" in err
    monkeypatch.setattr(targets.importlib.metadata, "version", lambda n: "0.0.1" if n == "libtpu" else real_version(n))
    with pytest.raises(ValueError, match=r"libtpu 0.0.1 does not match jax .* \(which needs libtpu==.*mistral4-jax\[tpu-aot\]"):
        targets.check_libtpu()


def test_missing_cuda_plugin_names_the_extra(monkeypatch):
    real_find = importlib.util.find_spec
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda n, *a: None if n == "jax_cuda12_plugin" else real_find(n, *a))
    with pytest.raises(ValueError, match=r"jax's CUDA plugin, which is not installed: pip install 'jax\[cuda12\]==.*'mistral4-jax\[gpu-aot\]'"):
        aot.compile_plan(REAL, "8xH200", layers=1)


def test_parse_collectives():
    """Lines of compiled TPU and GPU programs: sync ops count their result, async starts their outputs."""
    text = """
  %all-gather.11 = bf16[2048,4096]{1,0:T(8,128)(2,1)S(1)} all-gather(%param), channel_id=1, dimensions={1}
  ROOT %all-reduce = bf16[]{:T(256)} all-reduce(%convolution_reduce_fusion), channel_id=4, to_apply=%region_0.0.clone
  %all-gather-start = (bf16[65536,4096]{1,0}, bf16[131072,4096]{1,0}) all-gather-start(%param.17), channel_id=3
  %all-gather-done = bf16[131072,4096]{1,0} all-gather-done(%all-gather-start)
  %all-reduce-start.2 = bf16[1,4096]{1,0} all-reduce-start(%bitcast.71.0), channel_id=1, replica_groups={{0,1,2,3}}
  %all-reduce-done.2 = bf16[1,4096]{1,0} all-reduce-done(%all-reduce-start.2)
  %cp = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %fusion.3 = bf16[1,4096]{1,0} fusion(%all-reduce-done.2), kind=kLoop, calls=%fused_computation.3
"""
    assert hlo.parse_collectives(text) == {
        "all-gather": (2, 2048 * 4096 * 2 + 131072 * 4096 * 2),
        "all-reduce": (2, 2 + 4096 * 2),
        "collective-permute": (1, 8 * 128 * 4),
    }


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="GPU compiles need the gpu-aot extra (jax[cuda12], ~5.5 GB), kept out of the test install")
def test_compile_for_gpus():
    plan = aot.compile_plan(REAL, "8xH200", dtype="float8_e4m3fn", batch=1, context=4096, layers=1, steps=("decode",),
                            layer_loop="unroll")
    decode = plan.step("decode")
    assert plan.mesh == {"data": 1, "expert": 8, "tensor": 1} and decode.fits and decode.flops is None
    assert plan.weight_bytes == pytest.approx(plan.plan_weight_bytes, rel=0.05)
    assert decode.roofline_ms == pytest.approx(decode.reads_expected / 4.8e9)
    assert [(c.kind, c.count) for c in decode.collectives] == [("all-reduce", 1)]
