"""Shared helpers for the benchmarks: quiet stdout, timing, the machine's matmul rate, HF reference models.

Every benchmark prints exactly one JSON line on stdout; everything else (library chatter, progress)
goes to stderr. `quiet_stdout()` points file descriptor 1 at stderr for the whole run, so output
written by C/C++ code (XLA, torch) cannot slip in, and `emit()` writes the JSON line to the saved
original stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

_real_stdout_fd: int | None = None


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send everything written to stdout (Python or native) to stderr until the block ends."""
    global _real_stdout_fd
    sys.stdout.flush()
    _real_stdout_fd = os.dup(1)
    os.dup2(2, 1)
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = old
        os.dup2(_real_stdout_fd, 1)
        os.close(_real_stdout_fd)
        _real_stdout_fd = None


def emit(record: dict[str, Any]) -> None:
    """Write `record` as one JSON line to the real stdout (also inside `quiet_stdout()`)."""
    line = (json.dumps(record, sort_keys=False) + "\n").encode()
    os.write(_real_stdout_fd if _real_stdout_fd is not None else 1, line)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def config_path(name: str) -> str:
    """A bundled config's name (`small`, `tiny`, ...) or a path."""
    from mistral4_jax import configs  # deferred: importing mistral4_jax starts jax

    return configs.resolve(name)


def timeit(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall seconds of `reps` calls of fn (fn must block until its result is ready)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class MatmulRate:
    """The machine's float32 matmul rate: a jitted jnp [n, n] @ [n, n] (2 n^3 FLOPs), timed on demand.

    `sample(reps)` adds timings (call it next to the timings it is compared with, so both see the same
    load from other processes); `gflops()` is the median rate over all samples, `best()` the fastest.
    """

    def __init__(self, n: int = 2048) -> None:
        import jax
        import jax.numpy as jnp

        self.flops = 2 * n**3
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        self._run = lambda: jax.block_until_ready(f(a, b))
        self._run()
        self._run()
        self.times: list[float] = []

    def sample(self, reps: int) -> MatmulRate:
        self.times += timeit(self._run, reps)
        return self

    def gflops(self) -> float:
        return self.flops / median(self.times) / 1e9

    def best(self) -> float:
        return self.flops / min(self.times) / 1e9


def torch_matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """The same float32 [n, n] @ [n, n] rate measured through torch (for context next to the jax one)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    with torch.inference_mode():
        a @ b
        times = timeit(lambda: a @ b, reps)
    return 2 * n**3 / median(times) / 1e9


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes between `start()` and `stop()`.

    The benchmarks run on a small shared machine; this says how much of it others took while we timed
    (0 = quiet, 1 = every core busy with someone else). Linux only (/proc/stat); None elsewhere.
    """

    def __init__(self) -> None:
        self._t0: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        busy = (sum(v) - v[3] - v[4]) / hz  # all but idle and iowait
        return busy, sum(v) / hz, t.user + t.system

    def start(self) -> OtherLoad:
        self._t0 = self._sample()
        return self

    def stop(self) -> float | None:
        t1 = self._sample()
        if self._t0 is None or t1 is None:
            return None
        busy, total, own = (b - a for a, b in zip(self._t0, t1))
        return max(0.0, min(1.0, (busy - own) / total)) if total > 0 else None


def machine() -> str:
    """A short description of the host: CPU model, cores, OS."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def versions() -> dict[str, str]:
    import jax

    out = {"jax": jax.__version__, "jaxlib_backend": jax.default_backend()}
    with contextlib.suppress(ImportError):
        import torch

        out["torch"] = torch.__version__
    with contextlib.suppress(ImportError):
        import transformers

        out["transformers"] = transformers.__version__
    return out


def hf_reference(cfg: Any, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """A random (eval-mode) `transformers.Mistral4ForCausalLM` for our config `cfg`, built in `dtype`
    ("float32", "bfloat16") directly on the torch `device` ("cpu", "cuda")."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.Mistral4Config(**cfg.to_hf_dict())
    with torch.device(device):
        return transformers.Mistral4ForCausalLM._from_config(hf_cfg, dtype=getattr(torch, dtype)).eval()


def save_hf_reference(cfg: Any, directory: str, seed: int = 0):
    """A random float32 `transformers.Mistral4ForCausalLM` for our config `cfg`, saved to `directory`.

    Returns the (eval-mode) torch model, so both sides can run the very same weights: load ours from
    `directory` with `mistral4_jax.load(directory, dtype="float32")`.
    """
    model = hf_reference(cfg, seed=seed)
    model.save_pretrained(directory)
    return model
