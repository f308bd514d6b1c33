"""The `mistral4-jax` command line: one small function per subcommand.

    mistral4-jax convert SRC DST [--dtype ...] [--text-only] [--overwrite] [--resume]
    mistral4-jax inspect DST
    mistral4-jax plan --config configs/mistral-small-4-119b.json --mesh expert=8,tensor=2 --hbm 16GiB
    mistral4-jax generate --checkpoint DIR --prompt "..." [--reasoning-effort high] [--mesh ...]
    mistral4-jax generate --checkpoint DIR --input requests.jsonl --output results.jsonl
    mistral4-jax chat --checkpoint DIR
    mistral4-jax serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-context N]
    mistral4-jax finetune --checkpoint DIR --data train.jsonl --out RUN [--lora-rank 16] [--steps N] [--resume]
    mistral4-jax export RUN_OR_CKPT DST --format hf [--merge-lora]
    mistral4-jax demo

To add a subcommand, write `_add_<name>(subparsers)` that makes its parser with `_subcommand` (which adds
the common options, e.g. `-v`), declares its arguments and sets `run=<function(args) -> int>` (and
optionally `check=<function(args)>`, raising ValueError for options that cannot go together), and list
it in `SUBCOMMANDS`.

Exit status (the convention of argparse, git and GNU tools):
    0    success
    1    an error in the input data or the machine: a missing file, a bad config, checkpoint or request
         file, a mesh that does not fit the devices (`EXPECTED_ERRORS`): one line on stderr, no traceback
    2    a usage error: an unknown or missing option, a bad option value, options that do not go together
         (argparse's own checks and `check`), found before anything is loaded: the usage and one line
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the common options."""
    p = sub.add_parser(name, help=help, **kwargs)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.set_defaults(parser=p)
    return p


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from mistral4_jax.convert import cli

    p = _subcommand(sub, "convert", help="convert an HF or Mistral checkpoint into an Orbax checkpoint",
                    description="Convert an HF or Mistral safetensors checkpoint (bf16, float32 or FP8) into "
                                "this package's Orbax checkpoint, one layer at a time.")
    cli.add_arguments(p)
    p.set_defaults(run=cli.run)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "inspect", help="print the summary and parameter shapes of a converted checkpoint")
    p.add_argument("path", help="converted checkpoint directory")
    p.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from ..weights import checkpoint

    manifest, arrays = checkpoint.describe(args.path)
    src = manifest["source"]
    print(f"checkpoint  {args.path}")
    print(f"source      {src['path']} ({src['format']}, {src['tensors']} tensors, sha256 {src['sha256'][:16]}…)")
    print(f"dtype       {manifest['dtype']}{'  (text only)' if manifest.get('text_only') else ''}")
    print(f"tensors     {manifest['tensors']}")
    print(f"parameters  {manifest['parameters']:,}")
    print(f"layers      {', '.join(f'{k}: {v}' for k, v in manifest['layers'].items())}")
    vis = manifest.get("vision")
    print(f"vision      " + (f"{vis['layers']} layers + projector, {vis['parameters']:,} parameters ({vis['dtype']})"
                             if vis else "none (text only)"))
    print(f"files       {', '.join(manifest['files']) or '-'}")
    print(f"converter   {manifest['converter_version']} (format v{manifest['format_version']})")
    print("parameters (layer groups and vision/layers stacked as [layers, ...]):")
    for name, shape, dtype in _stacked(arrays):
        print(f"  {name:<44} {dtype:<14} {list(shape)}")
    return 0


def _stacked(arrays: list[tuple[str, tuple[int, ...], str]]) -> list[tuple[str, tuple[int, ...], str]]:
    """Per-layer arrays (`layers_moe/3/attn/o_proj`) folded into one stacked entry per name."""
    out: dict[str, tuple[tuple[int, ...], str, int]] = {}
    for name, shape, dtype in arrays:
        parts = name.split("/")
        if parts[0].startswith("layers_") and len(parts) > 2:
            name = "/".join([parts[0], *parts[2:]])
        n = out[name][2] if name in out else 0
        out[name] = (shape, dtype, n + 1)
    return [(name, (n, *shape) if name.startswith("layers_") else shape, dtype)
            for name, (shape, dtype, n) in out.items()]


def _add_running(sub: argparse._SubParsersAction) -> None:
    from . import commands

    from . import demo, serve, train

    for add in (commands.add_plan, commands.add_generate, commands.add_chat, serve.add_serve, train.add_finetune, train.add_export, demo.add_demo):
        add(sub, _subcommand)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert, _add_inspect, _add_running]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral4-jax", description="Mistral Small 4 in JAX: convert, inspect, run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mistral4-jax` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2; argparse has printed the usage and the error)
        return int(e.code or 0)
    try:
        if hasattr(args, "check"):
            args.check(args)
    except ValueError as e:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except EXPECTED_ERRORS as e:
        print(f"mistral4-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # one line; the converter's says what it kept
        print(f"mistral4-jax {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`mistral4-jax inspect DIR | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush does not fail too
        return 1

