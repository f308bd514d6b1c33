"""A fine-tuning run: a directory holding what it was started with (run.json), the train state's Orbax
checkpoints (checkpoints/<step>) and one metrics line per step (metrics.jsonl).

    run = finetune(RunConfig(checkpoint="ckpt", data="train.jsonl", out="run", steps=100))  # or resume=True
    model, trainable, spec = load_run("run")          # the base model and the latest trained arrays

`--resume` restores the latest checkpoint and continues with the same batches (`data.batch_at` depends on the
step only), so its losses equal an uninterrupted run's. Orbax writes each checkpoint to a temporary directory
and renames it when complete, so a killed run keeps its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..sharding import make_mesh
from .data import batch_at, pack, read_conversations
from .step import TrainSpec, TrainState, init_trainable, make_train_step, optimizer, schedule

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on (saved as run.json; a resumed run must match all of it)."""

    checkpoint: str
    data: str
    out: str
    spec: TrainSpec = TrainSpec()
    eval_data: str | None = None
    batch: int = 4
    accum: int = 1
    seq_len: int = 512
    packing: bool = True
    long: str = "truncate"
    seed: int = 0
    save_every: int = 50
    eval_every: int = 0
    dtype: str = "float32"
    mesh: str | None = None

    @property
    def steps(self) -> int:
        return self.spec.steps

    def identity(self) -> dict[str, Any]:
        """What run.json records: the settings and the data files' sha256 (not `out`)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "spec")}
        d["checkpoint"] = os.path.abspath(self.checkpoint)
        d["data"] = os.path.abspath(self.data)
        d["eval_data"] = None if self.eval_data is None else os.path.abspath(self.eval_data)
        d["data_sha256"] = _sha256(self.data)
        d["spec"] = self.spec.to_dict()
        return d


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpointer(out: str) -> Any:
    from orbax.checkpoint import v1 as ocp

    return ocp.training.Checkpointer(os.path.join(os.path.abspath(out), "checkpoints"),
                                     preservation_policy=ocp.training.preservation_policies.LatestN(2),
                                     cleanup_tmp_directories=True)


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def _check_resume(out: str, identity: dict[str, Any]) -> None:
    with open(os.path.join(out, RUN_FILE)) as f:
        saved = json.load(f)
    then, now = dict(saved, **saved.get("spec", {})), dict(identity, **identity.get("spec", {}))
    for k in sorted(set(then) | set(now) - {"spec"}):
        if then.get(k) != now.get(k):
            raise ValueError(f"{os.path.join(out, RUN_FILE)}: --resume with a different {k} "
                             f"({then.get(k)!r} then, {now.get(k)!r} now); start a new run directory instead")


def load_base(cfg: RunConfig) -> Any:
    import mistral4_jax

    mesh = make_mesh(cfg.mesh) if cfg.mesh else None
    return mistral4_jax.load(cfg.checkpoint, dtype=cfg.dtype, mesh=mesh, layer_loop="scan", text_only=True)


def finetune(cfg: RunConfig, resume: bool = False, progress: bool = True, log=print) -> list[dict[str, Any]]:
    """Train; returns the metrics of the steps run here (one dict per step: step, loss, tokens, grad_norm, lr,
    tok_s, and eval_loss where evaluated). ValueError for bad data, settings or a mismatched resume."""
    from tqdm import tqdm

    out = os.path.abspath(cfg.out)
    identity = cfg.identity()
    if resume:
        if not os.path.exists(os.path.join(out, RUN_FILE)):
            raise FileNotFoundError(f"--resume: no {RUN_FILE} in {out}")
        _check_resume(out, identity)
    elif os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"run directory {out} exists and is not empty: use --resume to continue it, or another --out")
    model = load_base(cfg)
    tok = model.require_tokenizer()
    examples, report = read_conversations(cfg.data, tok, cfg.seq_len, cfg.long)
    for e in report["errors"]:
        log(f"{cfg.data}:{e['line']}: skipped: {e['error']}")
    log(f"{cfg.data}: {len(examples)} conversations ({report['learned_tokens']:,} learned tokens of {report['tokens']:,}); "
        f"{len(report['errors'])} skipped, {report['truncated']} truncated, {report['dropped']} dropped "
        f"(longer than --seq-len {cfg.seq_len})")
    if not examples:
        raise ValueError(f"{cfg.data}: no conversation to learn from")
    rows = pack(examples, cfg.seq_len, cfg.packing)
    eval_rows = None
    if cfg.eval_data:
        eval_examples, eval_report = read_conversations(cfg.eval_data, tok, cfg.seq_len, cfg.long)
        for e in eval_report["errors"]:
            log(f"{cfg.eval_data}:{e['line']}: skipped: {e['error']}")
        eval_rows = pack(eval_examples, cfg.seq_len, False) if eval_examples else None

    spec, params = cfg.spec, model.params
    opt = optimizer(spec)
    trainable = init_trainable(params, spec, cfg.seed)
    state = TrainState(jnp.int32(0), trainable, opt.init(trainable))
    ckpt = _checkpointer(out)
    start = 0
    if resume and ckpt.latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state_tree(state))
        tree = ckpt.load(ckpt.latest.step, abstract)
        state = TrainState(tree["step"], tree["trainable"], tree["opt_state"])
        start = int(tree["step"])
        log(f"resuming {out} at step {start}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RUN_FILE), "w") as f:
        json.dump(identity, f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    kept = []
    if resume and os.path.exists(metrics_path):  # the lines of steps the restored state has taken
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    with open(metrics_path, "w") as f:
        f.writelines(kept)

    step_fn = make_train_step(model.config, params, spec, None, model.mesh, model.compute_dtype, model.rules)
    eval_fn = _eval_fn(model, spec) if eval_rows is not None else None
    schedule_lr = schedule(spec)
    history: list[dict[str, Any]] = []
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    log(f"training {n_trained:,} parameters ({len(trainable)} arrays) for {spec.steps} steps "
        f"of {cfg.batch} x {cfg.accum} rows x {cfg.seq_len} tokens; compiling the train step...")
    bar = tqdm(total=spec.steps, initial=start, desc="finetune", unit="step", disable=not progress, file=sys.stderr)
    try:
        for step in range(start, spec.steps):
            batch = batch_at(rows, step, cfg.batch, cfg.accum, cfg.seed)
            t0 = time.perf_counter()
            state, m = step_fn(state, batch)
            loss, tokens, gnorm = float(m["loss"]), int(m["tokens"]), float(m["grad_norm"])
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss, "tokens": tokens, "grad_norm": gnorm, "lr": float(schedule_lr(step)),
                   "tok_s": round(int(batch["attention_mask"].sum()) / dt, 1)}
            if eval_fn is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == spec.steps):
                rec["eval_loss"] = eval_fn(state.trainable, eval_rows)
            history.append(rec)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tok_s']:.0f}")
            bar.update(1)
            if (step + 1) % max(cfg.save_every, 1) == 0 or step + 1 == spec.steps:
                ckpt.save(step + 1, _state_tree(state), force=True)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
    return history


def _eval_fn(model: Any, spec: TrainSpec) -> Any:
    from ..model.loss import causal_lm_loss
    from .step import combine

    fn = jax.jit(lambda p, t, i, l, m: causal_lm_loss(combine(p, t, spec), model.config, i, l, m, dtype=model.compute_dtype,
                                                      mesh=model.mesh, rules=model.rules))

    def run(trainable: Any, rows: dict[str, np.ndarray]) -> float:
        total, count = 0.0, 0
        for i in range(len(rows["input_ids"])):
            loss, n = fn(model.params, trainable, *(rows[k][i:i + 1] for k in ("input_ids", "labels", "attention_mask")))
            total, count = total + float(loss) * int(n), count + int(n)
        return total / max(count, 1)

    return run


def read_run(out: str) -> RunConfig:
    """The RunConfig a run directory was started with."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out} is not a fine-tuning run (no {RUN_FILE})")
    with open(path) as f:
        d = json.load(f)
    d.pop("data_sha256", None)
    spec = TrainSpec.from_dict(d.pop("spec"))
    return RunConfig(out=out, spec=spec, **d)


def load_run(out: str, mesh: str | None = None) -> tuple[Any, dict[str, Any], TrainSpec, int]:
    """(base model, trained arrays of the latest checkpoint, spec, step) of a run directory."""
    cfg = read_run(out)
    if mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=mesh)
    model = load_base(cfg)
    trainable = init_trainable(model.params, cfg.spec, cfg.seed)
    ckpt = _checkpointer(out)
    try:
        if ckpt.latest is None:
            raise FileNotFoundError(f"{out}: no checkpoint saved yet")
        step = ckpt.latest.step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable)
        tree = ckpt.load(step, None)
        trainable = jax.tree.map(lambda a, x: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), abstract, tree["trainable"])
    finally:
        ckpt.close()
    return model, trainable, cfg.spec, int(step)
