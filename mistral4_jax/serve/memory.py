"""Refusal before allocation: a KV cache that would not fit the memory its devices have free.

Free memory per device: the environment variable `MISTRAL4_JAX_DEVICE_MEMORY` when set (bytes free per
device for the cache, e.g. "2GiB", read by `plan.memory.parse_bytes`: to plan for smaller devices, and
for tests); else on TPU/GPU the least `bytes_limit - bytes_in_use` (`device.memory_stats()`) over the
model's devices on this host, measured with the weights in place; else on CPU the host's MemAvailable
(/proc/meminfo) shared by those devices. Where none is known, nothing is checked.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from ..plan.memory import cache_bytes_per_device, format_bytes, parse_bytes

MEMORY_ENV = "MISTRAL4_JAX_DEVICE_MEMORY"


def check_cache_fits(model: Any, batch: int, slots: int, cache_dtype: Any) -> None:
    """ValueError naming the figures when a `batch` x `slots` cache of `cache_dtype` on `model`'s mesh (its
    `rules`; one device without a mesh) needs more bytes per device than are free (module docstring)."""
    sizes = dict(model.mesh.shape) if model.mesh is not None else {}
    need = cache_bytes_per_device(model.config, sizes, batch, slots, cache_dtype, model.rules)
    free = free_bytes_per_device(model.mesh)
    if free is not None and need > free[0]:
        raise ValueError(f"a {slots:,}-slot cache for {batch} row{'s' * (batch != 1)} needs {format_bytes(need)} per "
                         f"device (after the weights); {format_bytes(free[0])} free on {free[1]} (a shorter "
                         f"max_new_tokens or prompt, fewer rows, or more devices on the cache's axes would fit)")


def free_bytes_per_device(mesh: Any = None) -> tuple[int, str] | None:
    """(bytes free per device, where that was read) for the devices of `mesh` on this host (default device
    without a mesh), or None when unknown (module docstring)."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            return parse_bytes(override), MEMORY_ENV
        except ValueError as e:
            raise ValueError(f"{MEMORY_ENV}: {e}") from None
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()] if mesh is not None \
        else jax.local_devices()[:1]
    stats = [(d, d.memory_stats()) for d in devices]
    known = [(s["bytes_limit"] - s["bytes_in_use"], d) for d, s in stats if s and "bytes_limit" in s]
    if known:
        free, device = min(known, key=lambda x: x[0])
        return free, f"{device.platform.upper()}_{device.id}"
    if devices[0].platform == "cpu":
        available = _mem_available()
        if available is not None:
            n = len(devices)
            return available // n, f"this host (MemAvailable {format_bytes(available)} shared by {n} CPU device{'s' * (n != 1)})"
    return None


def _mem_available() -> int | None:
    """The host's MemAvailable in bytes (Linux /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
