"""Chunked prefill's memory: a 32,768-token prompt generates within a bound that does not grow with the square
of the context (measured in a subprocess, tests/longctx_memory_worker.py, so the peak is its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("free_first")  # conftest: their processes share the memory

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "longctx_memory_worker.py")
CONTEXT = 32768
MARGIN = 160 * 2**20
"""Room above the baseline and the cache for one chunk's temporaries and the long run's compilations. Measured
growth above the baseline (2 shared cores, XLA flags of conftest): 48-70 MiB (once 87) in chunks of 512-2048;
one unchunked 32,768-token prefill (`prefill_chunk` 32768: blockwise [T, 512] scores) 246 MiB, which fails;
one layer's [T, T] scores alone would take 4 GiB."""


def test_32k_prompt_peak_memory_is_bounded_by_cache_not_context_squared():
    """peak RSS <= RSS after a short run + the latent cache + a fixed margin, and that bound is far below the
    context^2 x heads x 4 bytes of one layer's full score matrix."""
    run = subprocess.run([sys.executable, WORKER, str(CONTEXT), "4"], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["tokens"] == 4 and r["chunk"] < CONTEXT
    bound = r["baseline_rss"] + r["cache_bytes"] + MARGIN
    mib = {k: round(v / 2**20, 1) for k, v in r.items() if k.endswith(("rss", "bytes"))}
    print(f"{CONTEXT}-token prompt in chunks of {r['chunk']}, {r['seconds']} s: peak {mib['peak_rss']} MiB, bound "
          f"{bound / 2**20:.1f} MiB (baseline {mib['baseline_rss']} + cache {mib['cache_bytes']} + margin "
          f"{MARGIN / 2**20:.0f}); full [T, T] scores {mib['full_scores_bytes']} MiB")
    assert r["peak_rss"] < bound
    assert bound < r["full_scores_bytes"] / 4
