"""Shared pytest setup: CPU, 8 simulated devices for mesh tests, float32; helpers live in helpers.py."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (the device count must be set before the backend starts)

jax.config.update("jax_num_cpu_devices", 8)
