"""The process whose memory tests/test_longctx_memory.py measures; not a test module itself.

    python longctx_memory_worker.py CONTEXT NEW [PREFILL_CHUNK]

A random tiny model (configs/tiny.json with 1 layer and 1 head, float32, nothing downloaded) generates
first after a short chunked prompt (300 tokens in chunks of 128: the same compiled functions, at small
shapes), which sets the baseline resident size, then NEW tokens after a CONTEXT-token prompt in chunks of
PREFILL_CHUNK (default: the model's `prefill_chunk`). Prints one JSON line: baseline_rss and peak_rss
(VmRSS after the short run, VmHWM at the end; bytes), cache_bytes (the latent cache generate allocates),
full_scores_bytes (CONTEXT^2 x heads x 4: one layer's float32 score matrix), chunk, tokens, seconds.
"""

import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
context, new = int(sys.argv[1]), int(sys.argv[2])

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mistral4_jax import Mistral4, Mistral4Config  # noqa: E402
from mistral4_jax.model import init_cache, init_params  # noqa: E402
from mistral4_jax.serve.generate import bucket, cache_slots  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


cfg = Mistral4Config.from_json(os.path.join(REPO, "configs", "tiny.json")).replace(num_hidden_layers=1,
                                                                                   num_attention_heads=1)
model = Mistral4(cfg, init_params(cfg, jax.random.key(0)))
model.verbose = False
rng = np.random.default_rng(0)
chunk = int(sys.argv[3]) if len(sys.argv) > 3 else model.prefill_chunk
model.prefill_chunk = 128
model.generate(rng.integers(3, cfg.vocab_size, 300).tolist(), max_new_tokens=new, stop_token_ids=[])
baseline = memory()["VmRSS"]

model.prefill_chunk = chunk
t0 = time.perf_counter()
out = model.generate(rng.integers(3, cfg.vocab_size, context).tolist(), max_new_tokens=new, stop_token_ids=[])
seconds = time.perf_counter() - t0
if context > chunk:  # the cache `Generator.stream` allocates
    slots = cache_slots(-(-context // chunk) * chunk + bucket(new), chunk)
else:
    slots = bucket(context) + bucket(new)
cache = jax.eval_shape(lambda: init_cache(cfg, 1, slots, np.float32))
print(json.dumps({
    "baseline_rss": baseline, "peak_rss": memory()["VmHWM"],
    "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)),
    "full_scores_bytes": context**2 * cfg.num_attention_heads * 4,
    "chunk": chunk, "tokens": len(out[0].tokens), "seconds": round(seconds, 2),
}))
