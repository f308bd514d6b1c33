"""One process of the 2-process x 4-device test (tests/test_multihost.py); not a test module itself.

    python multihost_worker.py PORT PROCESS_ID CHECKPOINT OUT.json [die]

Joins a 2-process JAX system on 127.0.0.1 (gloo), restores the converted checkpoint onto the global
8-device mesh, computes logits and greedy tokens; process 0 writes them to OUT.json. With `die`,
process 1 exits right after joining, and process 0 must then fail within the heartbeat timeout.
"""

import json
import os
import sys

port, pid, ckpt, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
die = len(sys.argv) > 5 and sys.argv[5] == "die"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60, heartbeat_timeout_seconds=5, shutdown_timeout_seconds=10)
if die and pid == 1:
    os._exit(3)

import numpy as np  # noqa: E402

import mistral4_jax  # noqa: E402
from mistral4_jax.distributed import is_main_process  # noqa: E402
from mistral4_jax.sharding import make_mesh  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
model = mistral4_jax.load(ckpt, dtype="float32", mesh=make_mesh("data=1,expert=4,tensor=2"))
gate = model.params["layers_moe"]["moe"]["experts_gate"]
local_experts = sorted({s.index[1].start for s in gate.addressable_shards})
ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(8, 12))
logits = model.logits(ids)
prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
tokens = [g.tokens for g in model.generate(prompts, max_new_tokens=6, stop_token_ids=[model.config.vocab_size - 1])]
if is_main_process():
    with open(out, "w") as f:
        json.dump({"logits": logits.tolist(), "tokens": tokens, "local_experts": local_experts}, f)

# the serving engine on the pod: process 0 takes the requests (from its own thread, as the HTTP server does), every
# process runs the same steps (HostSync); more requests than rows, so one waits for a freed row
from mistral4_jax.serve.engine import Engine, HostSync  # noqa: E402
from mistral4_jax.serve.generate import Request  # noqa: E402

engine = Engine(model, rows=2, max_context=32, steps_per_call=4, stop_token_ids=[model.config.vocab_size - 1],
                sync=HostSync(model))
if is_main_process():
    engine.start()
    jobs = [engine.submit(Request(p, 6)) for p in prompts]
    served = [j.wait(120).tokens for j in jobs]
    engine.shutdown(timeout=60)
    with open(out) as f:
        record = json.load(f)
    record["served"] = served
    with open(out, "w") as f:
        json.dump(record, f)
else:
    engine.serve_forever()  # until process 0 shuts down
    assert not engine.busy and not engine.sync.jobs, "a follower kept a request process 0 had ended"
