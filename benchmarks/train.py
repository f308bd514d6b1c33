"""Train-step throughput of mistral4_jax vs a plain torch training step of transformers' Mistral4ForCausalLM, and
the compiled train-step memory per chip of the real config on a TPU target.

    python benchmarks/train.py [--quick] [--config small] [--batch 2] [--tokens 128] [--compile v5p-8 | --no-compile]

Both sides start from the same random float32 weights (built by transformers, loaded into ours) and train the
same parameter group in full (`--train-params`, default the attention projections and norms: `attn`), the rest
frozen, with AdamW and clipping by global norm 1.0, on the same batch of `--batch` x `--tokens` random tokens:
torch runs forward(labels=...), backward, clip, step, zero_grad; ours one jitted `train.step.train_step` (no remat,
as torch keeps activations too). Each side is warmed up, then `--reps` steps are timed; tokens/s = batch x tokens
/ median step seconds; `ratio` = ours / torch. Our routed experts run the "ragged" kernel when differentiating
(the CPU "loop" kernel's traced trip counts cannot be reversed), which XLA:CPU runs as a dense masked matmul over
every expert: on CPU that does E/K times the expert work of a top-k loop (8x for the small config).

With `--compile TARGET` (default v5p-8) it also compiles one LoRA train step (rank 16 on attention, FP8 weights,
bf16 compute, batch 1 x 4,096 tokens) of the real 119B config for that TPU target and reports the compiler's
bytes per chip (`plan.train.compile_train_step`; needs the tpu-aot extra).

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import mistral4_jax
    from mistral4_jax import Mistral4Config
    from mistral4_jax.train.step import TrainSpec, TrainState, init_trainable, make_train_step, named_leaves, optimizer

    cfg = Mistral4Config.from_json(C.config_path(args.config))
    record: dict = {"benchmark": "train", "config": args.config, "batch": args.batch, "tokens": args.tokens,
                    "train_params": args.train_params, "machine": C.machine(), **C.versions()}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.batch, args.tokens))
    with tempfile.TemporaryDirectory() as d:
        ref = C.save_hf_reference(cfg, d)
        model = mistral4_jax.load(d, dtype="float32", layer_loop="scan")
    spec = TrainSpec(lora_rank=0, train_params=(args.train_params,), lr=1e-4, warmup_steps=0, steps=10_000, remat=False)
    trainable = init_trainable(model.params, spec)
    opt = optimizer(spec)
    state = TrainState(jnp.int32(0), trainable, opt.init(trainable))
    step = make_train_step(cfg, model.params, spec, opt)
    batch = {k: jnp.asarray(ids[None], jnp.int32) for k in ("input_ids", "labels")}
    batch["attention_mask"] = jnp.ones_like(batch["input_ids"])
    record["trained_parameters"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    C.log(f"ours: {record['trained_parameters']:,} trained parameters ({len(trainable)} arrays); compiling...")

    def ours():
        nonlocal state
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])

    # torch: the same parameter group (transformers' names of the tensors ours trains)
    names = set(named_leaves(model.params))
    trained = [p for n, p in ref.named_parameters() if ".self_attn." in n] if args.train_params == "attn" else None
    if trained is None:
        raise SystemExit(f"--train-params {args.train_params}: the torch side knows 'attn' only")
    assert any(n.endswith("attn.q_a_proj") or n.endswith("attn.q_proj") for n in names)
    ref.train()
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    torch_opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    tids = torch.tensor(ids)

    def theirs():
        out = ref(input_ids=tids, labels=tids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)

    load = C.OtherLoad().start()
    for fn in (ours, theirs):
        for _ in range(args.warmup):
            fn()
    t_ours = C.timeit(ours, args.reps)
    t_theirs = C.timeit(theirs, args.reps)
    tokens = args.batch * args.tokens
    record.update(ours_step_s=round(C.median(t_ours), 4), torch_step_s=round(C.median(t_theirs), 4),
                  ours_tok_s=round(tokens / C.median(t_ours), 1), torch_tok_s=round(tokens / C.median(t_theirs), 1),
                  ratio=round(C.median(t_theirs) / C.median(t_ours), 3), other_cpu=load.stop())
    if args.compile:
        from mistral4_jax.plan.train import compile_train_step

        C.log(f"compiling a LoRA train step of the real config for {args.compile}...")
        real = Mistral4Config.from_json(C.config_path("mistral-small-4-119b"))
        try:
            fig = compile_train_step(real, args.compile, None, jnp.float8_e4m3fn,
                                     TrainSpec(lora_rank=16, lora_targets=("attn",)), 1, 4096)
            record["compiled"] = fig
        except Exception as e:  # no libtpu, or the compiler's refusal
            record["compiled"] = {"target": args.compile, "error": " ".join(str(e).split())[:300]}
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", help="config name in configs/ or a path (default: small)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--train-params", default="attn", help="the parameter group both sides train (default attn)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", default="v5p-8", help="TPU target of the real-config LoRA compile (default v5p-8)")
    ap.add_argument("--no-compile", dest="compile", action="store_const", const=None)
    ap.add_argument("--quick", action="store_true", help="2 timed steps per side, 1 warm-up")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 2, 1
    with C.quiet_stdout():
        C.emit(run(args))


if __name__ == "__main__":
    main()
