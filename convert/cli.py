"""Command-line arguments of `mistral4-jax convert` (no heavy imports until it runs)."""

from __future__ import annotations

import argparse

OUTPUT_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source checkpoint directory (HF: config.json + *.safetensors; "
                                    "Mistral: params.json + consolidated*.safetensors)")
    parser.add_argument("dst", help="output directory (written atomically: a temporary sibling renamed when complete)")
    parser.add_argument("--dtype", default="bfloat16", choices=OUTPUT_DTYPES,
                        help="storage dtype of the output (default bfloat16); float8_e4m3fn keeps FP8 weights bit "
                             "for bit with their per-tensor / per-expert scales")
    parser.add_argument("--text-only", action="store_true",
                        help="convert only the text model (vision tensors of a multimodal checkpoint are skipped)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion of the same source")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .run import convert

    convert(args.src, args.dst, dtype=args.dtype, text_only=args.text_only, overwrite=args.overwrite,
            resume=args.resume, progress=not args.no_progress)
    return 0
