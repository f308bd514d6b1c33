"""Shared pytest setup: CPU, 8 simulated devices for mesh tests, float32; helpers live in helpers.py.

XLA compiles the tests' programs (tiny models, compiled by the hundred) without LLVM's optimisations and
with its older loop emitters instead of the fusion emitters: each setting cuts compilation ~2.5x (measured
on tests/test_generate.py: 70 programs, 47.7 s -> 18.5 s for the emitters), and the programs still run fast
enough. The settings reach the CLI, demo, notebook and multi-host processes the tests start through the
environment. After each test module, compiled programs and dead objects are freed so the run's memory
stays flat (after a test too, when the process has grown past 2 GiB). One persistent compilation cache (a
temporary directory, removed at the end) serves the programs compiled again after that, and in subprocesses.
"""

import atexit
import ctypes
import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # one persistent compilation cache for the run and its subprocesses:
    # modules free their compiled programs (below) and subprocesses start cold, yet many compile the same programs
    _CACHE = tempfile.mkdtemp(prefix="mistral4-jax-tests-xla-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402  (the device count and flags must be set before the backend starts)
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


RSS_SOFT_LIMIT = (1.5 if os.environ.get("PYTEST_XDIST_WORKER") else 2) * 1024**3
"""Past this resident size, a test's end also frees compiled programs and garbage (not only a module's end);
lower with two workers (pyproject's addopts), which share the machine's memory."""


def _free() -> None:
    jax.clear_caches()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True, scope="module")
def _free_after_module():
    yield
    _free()


@pytest.fixture
def free_first():
    """Free compiled programs and garbage before the test: for tests whose work runs in processes they start
    (notebook kernels, multi-host workers, the 32k memory worker), so those share the 3 GB with a lean parent."""
    _free()


@pytest.fixture(autouse=True)
def _free_when_large():
    yield
    if _rss() > RSS_SOFT_LIMIT:
        _free()
