"""Constrained decoding: a grammar per request and, at every step, a token mask from it.

A `Grammar` is a Lark grammar in llguidance's dialect (special tokens as ``<[id]>``, ``%json {schema}``) with the
llguidance tokenizer it is written for (`chat.grammar` builds them from chat requests through mistral-common's
`GrammarFactory`). `Masks` holds one llguidance `LLMatcher` per constrained row of a batch: before each decode step
it fills the rows' allowed-token bitmasks (packed, 32 tokens per int32 word, bit i of word w = token 32w + i;
unconstrained rows allow everything), and after the step it feeds each row the token it got. A row whose grammar
is complete (`Masks.complete`) ends there; a row whose matcher fails (it cannot, as long as every drawn token was
allowed) ends with an error (`Masks.errors`) instead of raising in the middle of a batch.

`apply(logits, allowed)` is the device side: logits of disallowed tokens go to -inf before sampling, so greedy
rows take the best allowed token and sampling rows draw among allowed tokens with their own filters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import llguidance
import llguidance.numpy as llg_np


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
    """A Lark grammar (llguidance's dialect) and the `llguidance.LLTokenizer` its tokens belong to."""

    lark: str
    tokenizer: Any

    def __post_init__(self) -> None:
        error = llguidance.LLMatcher.validate_grammar(self.lark, self.tokenizer)
        if error:
            raise ValueError(f"the grammar cannot be compiled: {' '.join(error.split())[:500]}")

    def matcher(self) -> Any:
        return llguidance.LLMatcher(self.tokenizer, self.lark)


class Masks:
    """Matchers and packed allowed-token masks [B, ceil(vocab / 32)] int32 for a batch whose rows have a
    `Grammar` or None (unconstrained: every bit set). Tokens past the grammar tokenizer's vocabulary are never
    allowed on a constrained row."""

    def __init__(self, grammars: Sequence[Grammar | None], vocab_size: int) -> None:
        self.matchers = [g.matcher() if g is not None else None for g in grammars]
        self.bits = np.full((len(grammars), -(-vocab_size // 32)), -1, np.int32)
        self._buffers = [llg_np.allocate_token_bitmask(1, g.tokenizer.vocab_size) if g is not None else None
                         for g in grammars]
        self.errors: list[str | None] = [m.get_error() if m is not None and m.is_error() else None
                                         for m in self.matchers]
        self.complete = [False] * len(grammars)

    @property
    def active(self) -> bool:
        """Some row is constrained."""
        return any(m is not None for m in self.matchers)

    def live(self, row: int) -> bool:
        """The row's grammar still decides its tokens (constrained, no error, not complete)."""
        return self.matchers[row] is not None and self.errors[row] is None and not self.complete[row]

    def feed(self, row: int, tokens: Sequence[int]) -> None:
        """Tokens the row generated (stop tokens excluded) into its matcher; a token the grammar refuses sets
        `errors[row]`; a grammar with nothing more to match sets `complete[row]`."""
        m = self.matchers[row]
        for t in tokens:
            if not self.live(row):
                if m is not None and self.errors[row] is None:
                    self.errors[row] = f"token {int(t)} follows a complete answer"
                return
            if not m.consume_token(int(t)):
                self.errors[row] = f"token {int(t)} does not continue the grammar: {m.get_error() or 'not allowed'}"
                return
            self.complete[row] = m.is_stopped()

    def fill(self) -> np.ndarray:
        """The allowed-token bitmasks of every row for its next token: [B, words] int32."""
        for i, m in enumerate(self.matchers):
            if self.live(i):
                buf = self._buffers[i]
                llg_np.fill_next_token_bitmask(m, buf, 0)
                k = min(buf.shape[1], self.bits.shape[1])
                self.bits[i] = 0
                self.bits[i, :k] = buf[0, :k]
        return self.bits


def apply(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """logits [B, V] with the tokens not allowed by the packed masks allowed [B, ceil(V / 32)] int32 at -inf
    (None: unchanged)."""
    if allowed is None:
        return logits
    b, v = logits.shape
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return jnp.where(bits.reshape(b, -1)[:, :v].astype(bool), logits, -jnp.inf)
