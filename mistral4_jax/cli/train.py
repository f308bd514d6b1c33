"""`mistral4-jax finetune` (LoRA / full fine-tuning with optax, `mistral4_jax.train`) and `mistral4-jax export`
(a converted checkpoint or a run, back to Hugging Face safetensors)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .commands import csv_list, positive_int


def add_finetune(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "finetune", help="fine-tune on chat conversations (LoRA or chosen parameter groups, optax)",
                   description="Train LoRA adapters (and/or whole parameter groups) on OpenAI-style chat conversations "
                               "(JSONL, one {\"messages\": [...]} per line; the loss counts assistant tokens only). "
                               "Checkpoints the train state every --save-every steps; --resume continues a run.")
    p.add_argument("--checkpoint", required=True, help="converted checkpoint or HF directory (with tekken.json)")
    p.add_argument("--data", required=True, help="training conversations, JSONL")
    p.add_argument("--eval", default=None, help="evaluation conversations, JSONL (loss at the end and every --eval-every)")
    p.add_argument("--out", required=True, help="run directory (run.json, checkpoints/, metrics.jsonl)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank; 0 = no adapters (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha: updates scale by alpha/rank (default 32)")
    p.add_argument("--lora-targets", type=csv_list, default=("attn",),
                   help="comma-separated weights or groups: attn, experts, shared_expert, mlp, q_a_proj, o_proj, ... "
                        "(default attn)")
    p.add_argument("--train-params", type=csv_list, default=(),
                   help="comma-separated glob patterns of parameters trained in full, e.g. '*norm*,router'")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps, then cosine decay (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="gradient clipping by global norm (default 1.0)")
    p.add_argument("--batch", type=positive_int, default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per row (default 512)")
    p.add_argument("--long", choices=("truncate", "drop"), default="truncate",
                   help="conversations longer than --seq-len: cut or leave out (reported either way)")
    p.add_argument("--no-packing", action="store_true", help="one conversation per row (default: pack short ones)")
    p.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing them per layer")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end only)")
    p.add_argument("--seed", type=int, default=0, help="adapter init and data order (default 0)")
    p.add_argument("--dtype", default="float32", help="parameter storage dtype (default float32)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,expert=2,tensor=2 (default: one device)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.set_defaults(run=run_finetune, check=check_finetune)


def check_finetune(args: argparse.Namespace) -> None:
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.lora_rank == 0 and not args.train_params:
        raise ValueError("nothing to train: --lora-rank 0 needs --train-params")


def run_finetune(args: argparse.Namespace) -> int:
    from mistral4_jax.train.run import RunConfig, finetune
    from mistral4_jax.train.step import TrainSpec

    spec = TrainSpec(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                     train_params=args.train_params, lr=args.lr, warmup_steps=args.warmup, steps=args.steps,
                     weight_decay=args.weight_decay, clip_norm=args.clip_norm, remat=not args.no_remat)
    cfg = RunConfig(checkpoint=args.checkpoint, data=args.data, out=args.out, spec=spec, eval_data=args.eval,
                    batch=args.batch, accum=args.grad_accum, seq_len=args.seq_len, packing=not args.no_packing,
                    long=args.long, seed=args.seed, save_every=args.save_every, eval_every=args.eval_every,
                    dtype=args.dtype, mesh=args.mesh)
    history = finetune(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}" + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
              + f"; run in {os.path.abspath(args.out)}")
    return 0


def add_export(sub: Any, subcommand: Any) -> None:
    p = subcommand(sub, "export", help="write a converted checkpoint or a fine-tuning run as Hugging Face safetensors",
                   description="SRC is a converted checkpoint (or HF directory) or a `finetune` run directory. "
                               "Writes config.json, safetensors and the tokenizer files that transformers' "
                               "Mistral4ForCausalLM loads; a run's adapters are merged into the weights with "
                               "--merge-lora, else saved as a PEFT-style adapter beside the base model.")
    p.add_argument("src", help="converted checkpoint, HF directory, or finetune run directory")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--format", choices=("hf",), default="hf", help="output format (hf: transformers safetensors)")
    p.add_argument("--merge-lora", action="store_true", help="fold a run's LoRA adapters into the weights")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the written weights (default bfloat16)")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from mistral4_jax.train.export import export

    path = export(args.src, args.dst, merge_lora=args.merge_lora, dtype=args.dtype)
    print(f"wrote {path}")
    return 0
