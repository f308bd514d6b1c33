"""The bundled model configs, installed as package data (`mistral4_jax.configs`).

    mistral-small-4-119b.json   Mistral-Small-4-119B-2603's text config
    small.json                  the benchmarks' config (hidden 1024, 4 layers, 32 experts)
    tiny.json                   the tests' config
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The bundled config names: ["mistral-small-4-119b", "small", "tiny"]."""
    return sorted(f[: -len(".json")] for f in os.listdir(DIR) if f.endswith(".json"))


def resolve(name_or_path: str) -> str:
    """An existing file or directory as given; else the bundled config of that name (`.json` optional)."""
    if os.path.exists(name_or_path):
        return name_or_path
    name = name_or_path.removesuffix(".json")
    if name in names():
        return os.path.join(DIR, f"{name}.json")
    raise FileNotFoundError(f"config {name_or_path!r}: no such file or directory, and no bundled config of that "
                            f"name (bundled: {', '.join(names())})")
