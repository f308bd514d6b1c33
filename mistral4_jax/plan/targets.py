"""Compile targets: TPU slices (`jax.experimental.topologies`, libtpu) and NVIDIA GPUs (XLA's published
GPU target specs, kept here as data), parsed from names like "v5e-16", "v5p-8", "8xH200"."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import importlib.util
import math
import os
import re
from typing import Any

import jax
from jax.experimental import topologies

from ..config import Mistral4Config
from .memory import GiB

@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice or a group of GPUs to compile for: chips, per-chip memory, bandwidth and peak."""

    name: str  # "v5e-16", "8xH200"
    platform: str  # "tpu" or "gpu"
    kind: str  # the chip
    chips: int
    hbm_bytes: int  # memory per chip
    hbm_bandwidth: float  # bytes/s per chip
    peak_flops: float  # dense bf16 flop/s per chip
    topology: str  # jax's topology name: "v5e:4x4", or "1x1x8" (slices x hosts x GPUs per host)
    chip_config: str  # TPU: "default" or "megacore"; GPU: the key of `GPU_SPECS`


# TPU generations (Google Cloud's published per-chip figures): name prefix -> (jax topology prefix, chip
# config, TensorCores per chip counted in slice names such as v5p-8, kind, HBM bytes, HBM bytes/s, bf16 flop/s)
TPU_CHIPS = {
    "v4": ("v4", "megacore", 2, "TPU v4", 32 * GiB, 1200e9, 275e12),
    "v5e": ("v5e", "default", 1, "TPU v5e", 16 * GiB, 819e9, 197e12),
    "v5p": ("v5", "megacore", 2, "TPU v5p", 95 * GiB, 2765e9, 459e12),
    "v6e": ("v6e", "default", 1, "TPU v6e", 32 * GiB, 1640e9, 918e12),
}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}

# NVIDIA GPUs: the `gpu_device_info` figures of XLA's published target configs (openxla/xla,
# xla/backends/gpu/target_config/specs/h100_sxm.txtpb and h200.txtpb, 2026), and peak bf16 flop/s
# from their matrix-unit rates (BF16: 2 x 1.8295 GHz x 4 units x 132 cores x 512 per clock).
_HOPPER = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
    "shared_memory_per_core": 233472, "threads_per_core_limit": 2048, "core_count": 132, "fpus_per_core": 128,
    "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
    "l2_cache_size": 52428800, "clock_rate_ghz": 1.98, "shared_memory_per_block_optin": 232448,
    "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
}
GPU_SPECS = {
    "H100": {**_HOPPER, "name": "NVIDIA H100 80GB HBM3", "memory_bandwidth": 3352320000000,
             "device_memory_size": 84942979072, "compute_capability": (9, 0), "peak_bf16": 2 * 1.8295201e9 * 4 * 132 * 512},
    "H200": {**_HOPPER, "name": "NVIDIA H200 141GB HBM3e", "memory_bandwidth": 4800000000000,
             "device_memory_size": 151397597184, "compute_capability": (9, 0), "peak_bf16": 2 * 1.8295201e9 * 4 * 132 * 512},
}

_TARGET_HELP = ("TPU slices v4-N, v5e-N, v5p-N, v6e-N (e.g. v5e-16, v5p-8, v6e-8; or a topology such as v5e:2x2) "
                f"or NxGPU with GPU in {', '.join(GPU_SPECS)} (e.g. 8xH200)")


def parse_target(name: str) -> Target:
    """"v5e-16" (Cloud slice name: chips, or TensorCores for v4/v5p), "v5e:4x4" (jax topology) or "8xH200"."""
    text = name.strip()
    m = re.fullmatch(r"(\d+)\s*x\s*([A-Za-z]\w*)", text)
    if m:
        n, gpu = int(m.group(1)), m.group(2).upper()
        if gpu not in GPU_SPECS or n < 1 or (n > 8 and n % 8):
            raise ValueError(f"unknown target {name!r}: GPU targets are NxGPU with GPU in {', '.join(GPU_SPECS)} "
                             "and N up to 8 or a multiple of 8 (e.g. 8xH200)")
        s = GPU_SPECS[gpu]
        topology = f"1x1x{n}" if n <= 8 else f"1x{n // 8}x8"
        return Target(f"{n}x{gpu}", "gpu", s["name"], n, s["device_memory_size"], float(s["memory_bandwidth"]),
                      s["peak_bf16"], topology, gpu)
    m = re.fullmatch(r"(v\d+[a-z]?)(?:-(\d+)|:(\d+(?:x\d+)*))", text.lower())
    gen = None if not m else {"v5": "v5p"}.get(m.group(1), m.group(1))
    if gen not in TPU_CHIPS:
        raise ValueError(f"unknown target {name!r}: expected {_TARGET_HELP}")
    prefix, chip_config, cores, kind, hbm, bandwidth, flops = TPU_CHIPS[gen]
    tori = _TORUS_3D if cores == 2 else _TORUS_2D
    if m.group(2):
        count = int(m.group(2))
        chips = count // cores
        if count % cores or chips not in tori:
            raise ValueError(f"unknown target {name!r}: {gen} slices are {gen}-N with N in "
                             f"{', '.join(str(c * cores) for c in tori)}")
        topology = f"{prefix}:{tori[chips]}"
    else:
        dims = [int(d) for d in m.group(3).split("x")]
        if len(dims) != len(next(iter(tori.values())).split("x")):
            raise ValueError(f"unknown target {name!r}: {gen} topologies have "
                             f"{len(next(iter(tori.values())).split('x'))} dimensions, e.g. {prefix}:{tori[4]}")
        chips, topology = math.prod(dims), f"{prefix}:{m.group(3)}"
    label = f"{gen}-{chips * cores}"
    return Target(label, "tpu", kind, chips, hbm, bandwidth, flops, topology, chip_config)


def default_mesh(target: Target, cfg: Mistral4Config) -> dict[str, int]:
    """Experts over up to 8 chips (a power of two dividing the chips and the experts), then up to 2-way
    tensor parallelism, the rest as data-parallel replicas: expert=8,tensor=2 on v5e-16, expert=8 on 8 GPUs."""
    expert = 1
    while expert * 2 <= 8 and target.chips % (expert * 2) == 0 and cfg.n_routed_experts % (expert * 2) == 0:
        expert *= 2
    tensor = 2 if target.chips % (expert * 2) == 0 else 1
    return {"data": target.chips // (expert * tensor), "expert": expert, "tensor": tensor}


def _fix_tpu() -> str:
    return (f"pip install 'jax[tpu]=={jax.__version__}' (the libtpu this jax was released with; "
            "the extra 'mistral4-jax[tpu-aot]' installs that pair for jax 0.10.2)")


def check_libtpu() -> None:
    """ValueError naming the fix when libtpu is missing or is not the version this jax was released with."""
    try:
        have = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"TPU targets need libtpu, which is not installed: {_fix_tpu()}") from None
    wanted = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or []
              if r.startswith("libtpu") and '"tpu"' in r]
    for req in wanted:
        pin = re.fullmatch(r"libtpu\s*==\s*([\w.*]+)", req)
        if pin and not fnmatch.fnmatch(have, pin.group(1)):
            raise ValueError(f"libtpu {have} does not match jax {jax.__version__} (which needs {req}): {_fix_tpu()}")


def _gpu_target_config(spec: dict[str, Any]) -> str:
    """A `GpuTargetConfigProto` in text form for the GPU of `spec`."""
    info = {k: v for k, v in spec.items() if k not in ("name", "compute_capability", "peak_bf16")}
    lines = [f"  {k}: {v}" for k, v in info.items()]
    major, minor = spec["compute_capability"]
    lines.append(f"  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: ACCELERATED_FEATURES }}")
    return ("gpu_device_info {\n" + "\n".join(lines) + "\n}\n"
            f'platform_name: "CUDA"\ndevice_description_str: "{spec["name"]}"\n')


def target_devices(target: Target) -> list[Any]:
    """The target's devices (compile-only: nothing runs on them); ValueError naming the extra to install."""
    if target.platform == "tpu":
        check_libtpu()
        # libtpu takes /tmp/libtpu_lockfile unless told that several processes may load it (compiling only)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        bounds = (2, 2, 1) if target.chips >= 4 else (1, 1, 1)
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                chip_config_name=target.chip_config, chips_per_host_bounds=bounds,
                                                num_slices=1)
        except Exception as e:  # libtpu failed to load or refused the topology
            raise ValueError(f"{target.name}: libtpu could not describe topology {target.topology} "
                             f"({str(e).splitlines()[0]}); {_fix_tpu()}") from None
    else:
        if importlib.util.find_spec("jax_cuda12_plugin") is None:
            raise ValueError(f"GPU targets need jax's CUDA plugin, which is not installed: pip install "
                             f"'jax[cuda12]=={jax.__version__}' (~5.5 GB; the extra 'mistral4-jax[gpu-aot]' "
                             "installs it for jax 0.10.2)")
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no GPU here: skip the cuInit check
        try:
            topo = topologies.get_topology_desc("aot", "cuda", target_config=_gpu_target_config(GPU_SPECS[target.chip_config]),
                                                topology=target.topology)
        except Exception as e:
            raise ValueError(f"{target.name}: jax's CUDA plugin could not describe the target "
                             f"({str(e).splitlines()[0]}); pip install 'jax[cuda12]=={jax.__version__}'") from None
    devices = list(topo.devices)
    if len(devices) != target.chips:
        raise ValueError(f"{target.name}: topology {target.topology} has {len(devices)} devices, expected {target.chips}")
    return devices
