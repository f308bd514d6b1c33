"""Constrained decoding on CPU: what a grammar costs per generated token, against the unconstrained decode loop.

    python benchmarks/constrained.py [--config tiny] [--prompt-words 24] [--new 64] [--reps 3]

The model: random weights (`model.init_params`, seed 0, float32) for `configs/<config>.json` with its
vocab_size set to the synthetic v15 tokenizer's (`cli.demo.write_synthetic_tekken`: the real 131,072-token
Tekken vocabulary), so every mask is as wide as the real model's (4,096 int32 words per row) and llguidance
walks the real token trie. No torch, nothing downloaded.

For batch sizes 1 and 8 (the same chat prompt in every row), greedy, `--new` new tokens, no stop token:
  unconstrained   `Generator.stream` without grammars: prefill, then the whole on-device decode loop
  constrained     every row under the grammar of `response_format={"type": "json_schema", ...}` (`chat_grammar`;
                  a list of at least 64 {"name", "score"} objects, so no row can finish within --new tokens):
                  one decode step per host round trip, each row's allowed-token mask filled on the host
                  (`Masks.fill`), its new token fed to its matcher (`Masks.feed`), masks applied on device
Both are timed from the first chunk (after prefill, which is excluded) to the end, divided by the decode steps
taken (tokens generated per row - 1): `*_step_ms_b{B}` = ms per generated token per row (one batch step),
medians over `--reps` runs after a warm-up run that compiles. `ratio_b{B}` = constrained / unconstrained.
`host_mask_ms_per_token_row`: `Masks.fill` + `Masks.feed` alone (time.perf_counter), replaying one row's
constrained tokens through a fresh matcher, per token (median over the repetitions); `fill_ms` / `feed_ms`
split it. `other_cpu` is the share of the machine other processes used while timing (0 = quiet).

Prints exactly one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
from decode import time_ours as time_stream  # noqa: E402  (prefill s, decode s, Generations)

BATCHES = (1, 8)

SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 64, "maxItems": 128,
    "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["name", "score"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
"""The answer's schema: strings, bounded integers, keys and nesting; at least 64 objects, each several tokens,
so the grammar cannot complete (and end a row) within the token budget."""
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "scores", "schema": SCHEMA}}


def host_mask_times(grammar, tokens, vocab_size: int) -> tuple[float, float]:
    """(fill seconds, feed seconds) per token of replaying `tokens` through a fresh one-row `Masks`: before
    each token its mask is filled, then the token is fed."""
    from mistral4_jax.serve.constrain import Masks

    masks = Masks([grammar], vocab_size)
    fill = feed = 0.0
    for t in tokens:
        t0 = time.perf_counter()
        masks.fill()
        t1 = time.perf_counter()
        masks.feed(0, [t])
        feed += time.perf_counter() - t1
        fill += t1 - t0
    assert masks.errors[0] is None, masks.errors[0]
    return fill / len(tokens), feed / len(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--prompt-words", type=int, default=24, help="words of the user message")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    with C.quiet_stdout():
        import jax

        from mistral4_jax import Mistral4, Mistral4Config
        from mistral4_jax import model as M
        from mistral4_jax.cli.demo import write_synthetic_tekken
        from mistral4_jax.serve.chat import Tokenizer
        from mistral4_jax.serve.chat.grammar import chat_grammar
        from mistral4_jax.serve.generate import Request

        tmp = tempfile.TemporaryDirectory()  # kept to the end: the tokenizer may read its file lazily
        tok = Tokenizer.from_dir(write_synthetic_tekken(tmp.name))
        vocab = tok.vocab_size
        cfg = Mistral4Config.from_json(C.config_path(args.config)).replace(vocab_size=vocab)
        model = Mistral4(cfg, M.init_params(cfg, jax.random.PRNGKey(0)), dtype="float32", compute_dtype="float32")
        model.tokenizer = tok
        C.log(f"{args.config} config, vocab {vocab}: building the grammar")
        t0 = time.perf_counter()
        grammar = chat_grammar(tok, None, "auto", RESPONSE_FORMAT, "none")
        grammar_s = time.perf_counter() - t0
        words = " ".join(["scores"] * max(1, args.prompt_words - 4))
        prompt = tok.encode_chat([{"role": "user", "content": f"List the {words} please."}])

        record: dict = {"bench": "constrained", "config": args.config, "vocab_size": vocab, "new_tokens": args.new,
                        "prompt_tokens": len(prompt), "reps": args.reps, "grammar_build_s": round(grammar_s, 3)}
        load = C.OtherLoad().start()
        replay = None
        for b in BATCHES:
            modes = {"unconstrained": None, "constrained": grammar}
            for mode, g in modes.items():
                requests = [Request(list(prompt), args.new, grammar=g) for _ in range(b)]
                C.log(f"batch {b}, {mode}: warm-up (compiles)")
                time_stream(model, requests)
                runs = [time_stream(model, requests) for _ in range(args.reps)]
                gens = runs[-1][2]
                produced = [len(x.tokens) for x in gens]
                assert all(x.error is None for x in gens), [x.error for x in gens]
                steps = max(produced) - 1
                step_ms = C.median([d for _, d, _ in runs]) / steps * 1e3
                record[f"{mode}_step_ms_b{b}"] = round(step_ms, 3)
                record[f"{mode}_prefill_s_b{b}"] = round(C.median([p for p, _, _ in runs]), 4)
                record[f"{mode}_tokens_per_row_b{b}"] = min(produced) if min(produced) == max(produced) else produced
                C.log(f"batch {b}, {mode}: {step_ms:.3f} ms per decode step, {produced} tokens per row")
                if g is not None and replay is None:
                    replay = gens[0].tokens
            ratio = record[f"constrained_step_ms_b{b}"] / record[f"unconstrained_step_ms_b{b}"]
            record[f"ratio_b{b}"] = round(ratio, 3)
        C.log("host mask work alone")
        host_mask_times(grammar, replay, vocab)  # warm-up
        times = [host_mask_times(grammar, replay, vocab) for _ in range(args.reps)]
        fill, feed = C.median([f for f, _ in times]), C.median([f for _, f in times])
        other = load.stop()
        record.update(
            host_mask_ms_per_token_row=round((fill + feed) * 1e3, 4),
            fill_ms=round(fill * 1e3, 4),
            feed_ms=round(feed * 1e3, 4),
            mask_words=-(-vocab // 32),
            other_cpu=None if other is None else round(other, 3),
            machine=C.machine(),
            **C.versions(),
        )
        tmp.cleanup()
    C.emit(record)


if __name__ == "__main__":
    main()
