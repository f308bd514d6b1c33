"""HF's `ACT2FN` activations (transformers/activations.py) in JAX, by the same names and formulas.

Used by the text model's gated MLPs and experts (`hidden_act`) and by the vision tower and projector.
`prelu` and `xielu` are left out: in transformers they are modules with learned weights of their own,
which a Mistral 4 checkpoint would have to carry per MLP.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _gelu_erf(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _softplus(x: Array) -> Array:
    """torch's softplus (beta 1, threshold 20: x itself above 20)."""
    return jnp.where(x > 20, x, jax.nn.softplus(x))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_10": lambda x: jnp.clip(_gelu_erf(x), -10, 10),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "hardswish": jax.nn.hard_swish,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    "linear": lambda x: x,
    "mish": lambda x: x * jnp.tanh(_softplus(x)),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sqrtsoftplus": lambda x: jnp.sqrt(_softplus(x)),
    "tanh": jnp.tanh,
}
"""Name -> elementwise function. "gelu" is the exact (erf) GELU; the "*tanh*", "gelu_new" and
"gelu_accurate" entries its tanh approximation."""

LEARNED = ("prelu", "xielu")
"""ACT2FN names with learned parameters (refused)."""


def check_activation(field: str, name: str) -> None:
    """ValueError naming config `field` unless `name` is one of `ACTIVATIONS`."""
    if name in ACTIVATIONS:
        return
    why = " (it has learned weights, which are not supported)" if name in LEARNED else ""
    raise ValueError(f"config field {field!r} must be one of {sorted(ACTIVATIONS)}, got {name!r}{why}")
