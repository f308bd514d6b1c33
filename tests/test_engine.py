"""Continuous batching (`serve.engine.Engine`) against offline generation on a tiny random model: more requests
than decode rows, prompts long enough for chunked prefill, greedy and sampled rows, a cache small enough that the
write slot comes round (compaction): every request gets the tokens offline `generate` gives it. Then cancellation,
timeouts, bad requests, and the multi-host request encoding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mistral4_jax import Mistral4
from mistral4_jax import model as M
from mistral4_jax.serve.engine import Engine, HostSync, Job, QueueFull
from mistral4_jax.serve.generate import Request
from mistral4_jax.serve.sampling import SamplingParams
from helpers import TINY

STOP = 7


@pytest.fixture(scope="module")
def model():
    m = Mistral4(TINY, M.init_params(TINY, jax.random.key(0)))
    m.verbose = False
    m.prefill_chunk = 16  # prompts over 16 tokens are prefilled chunk by chunk
    return m


def _requests(n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    samplers = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_k=20),
                SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05)]
    return [Request(rng.integers(12, TINY.vocab_size, int(rng.integers(3, 40))).tolist(), int(rng.integers(1, 30)),
                    samplers[i % 4], seed=i) for i in range(n)]


def test_engine_equals_offline_generate(model):
    requests = _requests(16)
    want = model.generator.generate(requests, [STOP])
    engine = Engine(model, rows=3, max_context=72, steps_per_call=4, stop_token_ids=[STOP])
    got = engine.run(requests)
    for i, (a, b) in enumerate(zip(want, got)):
        assert (b.tokens, b.finish_reason, b.prompt_tokens) == (a.tokens, a.finish_reason, a.prompt_tokens), i
    assert engine.stats.compactions > 0, "the write slot never came round: the test would not cover compaction"
    assert any(len(r.prompt) > model.prefill_chunk for r in requests)
    assert engine.stats.generated_tokens == sum(len(g.tokens) for g in want) and not engine.live.any()


def test_cancel_timeout_and_refusals(model):
    engine = Engine(model, rows=2, max_context=64, steps_per_call=2, max_queue=3, stop_token_ids=[])
    long = [Request([5, 6, 8], 60) for _ in range(3)]
    jobs = [engine.submit(r, timeout=None if i < 2 else 0.0) for i, r in enumerate(long)]
    seen = []
    jobs[0].on_tokens = seen.extend
    engine.step()  # one prompt per step while rows decode (prefill_budget: 16 tokens here)
    assert engine.live.sum() == 1
    engine.step()
    assert engine.live.sum() == 2 and jobs[2].result.finish_reason == "timeout"  # it waited past its deadline
    engine.cancel(jobs[0])
    engine.step()
    assert jobs[0].result.finish_reason == "cancelled" and seen == jobs[0].result.tokens
    assert engine.live.sum() == 1  # its row is free at once
    again = engine.submit(Request([5, 6, 8], 3))  # takes the freed row; same prompt, same greedy tokens
    while again.result is None:
        engine.step()
    assert again.result.tokens == model.generator.generate([Request([5, 6, 8], 3)], [])[0].tokens
    engine.cancel(jobs[1])
    engine.step()
    assert not engine.busy
    for bad, words in ((Request([]), "empty"), (Request([1, 10**6]), "token ids"), (Request([1], 0), "max_tokens"),
                       (Request([1] * 60, 10), "exceeds the context"), (Request([1], 4, images=[np.zeros((3, 4, 4))]),
                                                                          "no vision tower")):
        with pytest.raises(ValueError, match=words):
            engine.submit(bad)
    for _ in range(3):
        engine.submit(Request([1, 2], 2))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], 2))


def test_multihost_requests_cross_as_json(model):
    """What process 0 broadcasts rebuilds the same request on the others (`HostSync`)."""
    sync = HostSync(model)
    r = Request([1, 2, 3], 5, SamplingParams(temperature=0.5, top_k=3), seed=9,
                images=(np.arange(48, dtype=np.float32).reshape(3, 4, 4),))
    job = Job(r, 4)
    kind, back = sync._decode(sync._encode("job", job))
    assert kind == "job" and back.id == 4
    b = back.request
    assert (list(b.prompt), b.max_new_tokens, b.sampling, b.seed) == ([1, 2, 3], 5, r.sampling, 9)
    np.testing.assert_array_equal(b.images[0], r.images[0])
    assert sync._decode(sync._encode("cancelled", job)) == ("cancelled", back)
