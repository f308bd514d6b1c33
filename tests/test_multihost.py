"""Multi-host: 2 processes x 4 CPU devices on 127.0.0.1 form one 8-device system, restore a converted
checkpoint onto the global mesh and compute what one process computes; a dead peer fails the survivor
within a bounded time. Every subprocess runs under a timeout, so the test never hangs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import mistral4_jax
from mistral4_jax.convert import convert
from helpers import TINY, make_hf_model, save_hf

pytestmark = pytest.mark.usefixtures("free_first")  # conftest: their processes share the memory

CFG = TINY.replace(num_attention_heads=8)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ckpt: str, out: str, *extra: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    env = dict(os.environ)  # XLA_FLAGS too: conftest's compile-time flags
    return [subprocess.Popen([sys.executable, WORKER, port, str(i), ckpt, out, *extra], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"multi-host worker still running after {timeout} s")
        results.append((p.returncode, out))
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    save_hf(make_hf_model(CFG, seed=31), str(root / "hf"))
    convert(str(root / "hf"), str(root / "ckpt"), dtype="float32", progress=False)
    single = mistral4_jax.load(root / "ckpt", dtype="float32")
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(8, 12))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    tokens = [g.tokens for g in single.generate(prompts, max_new_tokens=6, stop_token_ids=[CFG.vocab_size - 1])]
    return str(root / "ckpt"), single.logits(ids), tokens


def test_two_processes_equal_one(converted, tmp_path):
    ckpt, logits, tokens = converted
    out = str(tmp_path / "out.json")
    results = _wait(_launch(ckpt, out), timeout=300)
    assert [rc for rc, _ in results] == [0, 0], "\n".join(f"--- process {i} (rc {rc}):\n{log[-2500:]}"
                                                          for i, (rc, log) in enumerate(results))
    got = json.load(open(out))
    np.testing.assert_allclose(np.asarray(got["logits"]), logits, atol=1e-4, rtol=0)
    assert got["tokens"] == tokens
    assert got["served"] == tokens  # the continuous-batching engine on both processes (HostSync) answers the same
    assert len(got["local_experts"]) == 2  # process 0 holds 2 of the 4 expert shards (its 4 devices)


def test_dead_peer_fails_the_survivor(converted, tmp_path):
    """The survivor exits with an error (within `_wait`'s bound, else the test fails) and writes nothing."""
    ckpt, _, _ = converted
    out = tmp_path / "x.json"
    (rc0, log0), (rc1, _) = _wait(_launch(ckpt, str(out), "die"), timeout=180)
    assert rc1 == 3
    assert rc0 != 0, log0[-2000:]
    assert not out.exists()
