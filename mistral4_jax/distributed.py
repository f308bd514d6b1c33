"""Multi-host helpers: bringing results to the host, and which process writes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_host(x: Any) -> np.ndarray:
    """A jax array as numpy on this host: the array itself if this process holds all of it, else gathered
    from every process (`process_allgather`). Every process must call this together."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_main_process() -> bool:
    """True on the process that prints and writes outputs (process 0)."""
    return jax.process_index() == 0
