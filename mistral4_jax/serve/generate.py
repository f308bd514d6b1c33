"""Batched generation: a jitted prefill, then a jitted on-device decode loop over the latent KV cache.

Prompts of different lengths share a batch by left padding to a bucketed length (powers of two from
16), so every row writes its next token into the same cache slot and a new prompt length does not
always recompile. The decode loop (`lax.while_loop`) samples on device, checks stop tokens and
per-row token budgets on device, and donates the cache: no host round trip per token. Streaming runs
the same loop in chunks of `chunk` tokens and yields what each chunk produced.

Compilation: every jitted function here is compiled ahead of time once per argument signature (shapes,
dtypes, shardings; `CompiledFn`), and each new compilation is announced on stderr while it runs
("compiling prefill for batch 1 x 64 tokens, 320-slot cache (first use of this shape)... 21.3 s") unless
`model.verbose` is False; a shape seen before runs its compiled program silently. What compiles anew: the
batch size, the prompt bucket and the new-token bucket (powers of two ≥ 16). Sampling settings, seeds,
stop ids (up to 8) and `max_new_tokens` within a bucket do not.

Chat sessions (`ChatSession`, in chat/session.py) keep one conversation's cache between turns and prefill only
the new turn: `Generator.extend` writes a chunk of `prefill_chunk` tokens (right padded) at a slot of an
existing cache, attending to the cached prefix and to itself (absorbed MLA, `model.forward(decode=True)`),
so every turn of every length reuses one compiled chunk function per cache bucket; the cache grows to the
next power of two (`Generator.grow`, a copy) when a turn would overflow it.

Constrained rows (`Request.grammar`, `constrain`): the first token and every decode step take packed masks of
the allowed tokens, filled on the host by each row's grammar matcher from the tokens so far; a batch holding a
constrained row therefore runs the decode loop one step per call (`follow`), and its unconstrained rows allow
every token (same tokens as without masks). The masked programs are compiled once per shape, beside the others.

Images (`Request.images`, a model with a vision tower): before prefill, the images of all rows are run
through the vision tower and projector together (`Mistral4.request_image_features`, its own jitted function,
compiled per packed-patch bucket); the features, padded to a power of two ≥ 16 rows (one more recompile
key), replace the `[IMG]` token embeddings in prefill, rows in batch order. Decode is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from .. import model as M
from ..distributed import is_main_process, to_host
from .constrain import Grammar, Masks, apply as apply_masks
from .memory import check_cache_fits
from .sampling import SamplingParams, row_keys, sample

if TYPE_CHECKING:
    from ..api import Mistral4

log = logging.getLogger(__name__)


PREFILL_CHUNK = {"cpu": 512, "tpu": 4096, "gpu": 4096}
"""Default prompt tokens per prefill call by platform (`Mistral4.prefill_chunk`); longer prompts are prefilled
chunk by chunk. CPU: 512 (benchmarks/longctx.py at 16,384 tokens, prefill tok/s for chunks 512 / 1,024 /
2,048 / 4,096: 13,008 / 11,264 / 8,477 / 7,678; larger chunks compute more of each chunk's masked upper
triangle and leave the caches). TPU/GPU: 4,096, where every chunk reads the chip's weights once (v5e-16, FP8:
a 4,096-token chunk is about as much compute time as weight-read time, `plan --compile`)."""


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two ≥ max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prefill_bar(model: Any, tokens: int, chunks: int) -> tqdm:
    """A progress bar on stderr over a prompt's `tokens`, shown for prefills of more than one chunk (process 0,
    `model.verbose`)."""
    show = chunks > 1 and bool(getattr(model, "verbose", True) and is_main_process())
    return tqdm(total=tokens, unit="tok", desc="prefill", disable=not show, file=sys.stderr, leave=False)


def cache_slots(n: int, multiple: int) -> int:
    """Slots of a cache for n tokens: a multiple of `multiple` at most 25% above n on a grid of four sizes per
    power of two (so long prompts of nearby lengths share compiled programs)."""
    step = max(multiple, bucket(n) // 8)
    return -(-n // step) * step


@dataclasses.dataclass
class Generation:
    """One row's result: generated token ids (without the stop token), and why it ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, or a grammar completed), "length" (max_new_tokens) or "error"
    prompt_tokens: int
    error: str | None = None
    """For finish_reason "error": why (a constrained row whose grammar refused a token)."""


@dataclasses.dataclass
class Request:
    """One prompt with its own settings (the batch mixes them without recompiling)."""

    prompt: Sequence[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int = 0
    images: Sequence[Any] = ()
    """Images for the prompt's `[IMG]` tokens, in order: `image.ProcessedImage`s or preprocessed pixel
    arrays [3, H, W] (needs a model with a vision tower)."""
    grammar: Grammar | None = None
    """Constrained decoding (`constrain.Grammar`): every token is drawn among those the grammar allows. A batch
    with a constrained row steps one token per host round trip (the masks come from the host); without one,
    the decode loop stays on device."""


# ------------------------------------------------------------------------------------ compilation
def _signature(args: tuple[Any, ...]) -> Any:
    """What a compiled program is specialised to: the tree structure and each leaf's shape, dtype and (on a
    mesh) sharding."""
    leaves, tree = jax.tree_util.tree_flatten(args)

    def leaf(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return (np.shape(x), str(dtype), bool(getattr(x, "weak_type", False)),
                sharding if isinstance(sharding, jax.sharding.NamedSharding) else None)

    return tree, tuple(leaf(x) for x in leaves)


class CompiledFn:
    """A function jitted and compiled ahead of time once per argument signature (`_signature`).

    `describe(*args)` names the shape in words; `announce(text)` is called before each new compilation and
    returns a callable taking the seconds it took. `compiles` counts the compilations so far.
    Call it like the function (positional arguments only); `executable(*args)` compiles without running.
    """

    def __init__(self, fn: Callable[..., Any], describe: Callable[..., str],
                 announce: Callable[[str], Callable[[float], None]], donate_argnames: tuple[str, ...] = ()) -> None:
        self._jit = jax.jit(fn, donate_argnames=donate_argnames)
        self._describe = describe
        self._announce = announce
        self._compiled: dict[Any, Any] = {}
        self.compiles = 0

    def executable(self, *args: Any) -> Any:
        key = _signature(args)
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            finished = self._announce(f"compiling {self._describe(*args)} (first use of this shape)")
            try:
                exe = self._compiled[key] = self._jit.lower(*args).compile()
                self.compiles += 1
            finally:
                finished(time.perf_counter() - t0)
        return exe

    def __call__(self, *args: Any) -> Any:
        return self.executable(*args)(*args)


@struct.dataclass
class DecodeState:
    """The carry of the decode loop (`lax.while_loop`), for B rows and N new-token slots.

    cache    the model's latent cache (`model.Cache`: valid [B, S], per group latent/k_rope [Lg, B, S, .])
    tokens   int32 [B, N]  generated tokens; tokens[:, i] is each row's token i (0 after a row is done)
    step     int32 []      tokens generated so far (the next one goes to tokens[:, step])
    start    int32 []      cache slot of tokens[:, 0] (the same for every row)
    lengths  int32 [B]     position of tokens[:, 0] in each row (its prompt length)
    stopped  bool [B]      the row produced a stop token
    done     bool [B]      the row is finished: a stop token or its `max_new_tokens`
    """

    cache: M.Cache
    tokens: jax.Array
    step: jax.Array
    start: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    done: jax.Array


class Stream(Iterator[Any]):
    """The chunks of one streaming call (`Generator.stream`, `ChatSession.stream`); once it is exhausted,
    `result` holds what the call produced (None before): one `Generation` per request, or a `ChatResult`."""

    def __init__(self, chunks: Iterator[Any]) -> None:
        self._chunks = chunks
        self.result: Any = None

    def __next__(self) -> Any:
        try:
            return next(self._chunks)
        except StopIteration as end:
            self.result = end.value
            raise


class Generator:
    """Compiled prefill/decode functions for one model; reused across calls (compiles once per bucket)."""

    def __init__(self, model: Mistral4, cache_dtype: Any = None) -> None:
        self.model = model
        self.cache_dtype = cache_dtype or model.compute_dtype
        self._prefill = CompiledFn(
            self._prefill_impl, lambda p, ids, m, cache, *a: f"prefill for batch {ids.shape[0]} x {ids.shape[1]} tokens, "
            f"{cache.slots}-slot cache", self._announce, donate_argnames=("cache",))
        self._start = CompiledFn(
            self._first_state, lambda cache, logits, *a: f"first token for batch {logits.shape[0]}, {cache.slots}-slot cache",
            self._announce, donate_argnames=("cache",))
        self._logits = {last_only: CompiledFn(
            functools.partial(self._logits_impl, last_only=last_only), lambda p, cache, ids, *a: f"chunked "
            f"{'prefill' if last_only else 'logits'} for batch {ids.shape[0]} x {ids.shape[1]}-token chunks, "
            f"{cache.slots}-slot cache", self._announce, donate_argnames=("cache",)) for last_only in (False, True)}
        self._extend = CompiledFn(
            self._extend_impl, lambda p, cache, ids, n, i, tokens, *a: f"chat prefill for {ids.shape[1]}-token chunks, "
            f"{cache.slots}-slot cache, {tokens.shape[1]} new tokens", self._announce, donate_argnames=("cache",))
        self._decode = CompiledFn(
            self._decode_impl, lambda p, st, *a: f"decode loop for batch {st.tokens.shape[0]} x "
            f"{st.tokens.shape[1]} new tokens, {st.cache.slots}-slot cache", self._announce,
            donate_argnames=("state",))
        self._grow = CompiledFn(
            self._grow_impl, lambda old, new: f"cache growth from {old.slots} to {new.slots} slots",
            self._announce, donate_argnames=("new",))

    @property
    def compiles(self) -> int:
        """Compilations so far (each announced on stderr when `model.verbose`)."""
        return sum(f.compiles for f in (self._prefill, self._start, *self._logits.values(), self._extend, self._decode,
                                          self._grow))

    def _announce(self, text: str) -> Callable[[float], None]:
        """Print `text...` on stderr (process 0, `model.verbose`); the returned callable ends the line with the
        seconds it took."""
        if not (getattr(self.model, "verbose", True) and is_main_process()):
            return lambda seconds: None
        print(f"mistral4-jax: {text}...", end="", file=sys.stderr, flush=True)
        return lambda seconds: print(f" {seconds:.1f} s", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------- jitted
    def _first_state(self, cache, logits, start, lengths, tokens, sampling, seeds, stop_ids, max_new,
                     allowed=None) -> DecodeState:
        """The decode state after a prefill: token 0 sampled from logits [B, X]; it goes to cache slot `start`
        (scalar) at position `lengths` [B]. tokens [B, N] (zeros) is the buffer of generated tokens.
        allowed [B, ceil(X / 32)] int32 (or None): packed masks of the tokens each row may draw (`constrain`)."""
        tok = sample(apply_masks(logits, allowed), row_keys(seeds, 0), *sampling)
        stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        return DecodeState(cache=cache, tokens=tokens.at[:, 0].set(tok), step=jnp.int32(1),
                           start=jnp.asarray(start, jnp.int32), lengths=lengths.astype(jnp.int32), stopped=stopped,
                           done=stopped | (max_new <= 1))

    def _prefill_impl(self, params, ids, mask, cache, tokens, sampling, seeds, stop_ids, max_new, image_features=None,
                      allowed=None):
        """ids, mask [B, Tp] (left padded) into slots 0..Tp-1 of an empty cache -> decode state.
        image_features [M, D] (or None) replace the `[IMG]` token embeddings, in order."""
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        logits, _, cache = self.model.apply(params, ids, positions, mask.astype(bool), image_features, cache=cache,
                                            index=0, last_only=True)
        return self._first_state(cache, logits[:, 0], ids.shape[1], mask.sum(-1), tokens, sampling, seeds, stop_ids,
                                 max_new, allowed)

    def _extend_impl(self, params, cache, ids, n, index, tokens, sampling, seeds, stop_ids, max_new,
                     image_features=None, allowed=None):
        """A chunk ids [B, C] whose first n (scalar) tokens are real (right padding) into cache slots
        index..index+C-1, at positions index.., attending to the cache before it and to itself -> decode state
        for a first token after token n-1. All rows share index and n (a chat session has one row)."""
        b, c = ids.shape
        positions = jnp.broadcast_to(index + jnp.arange(c, dtype=jnp.int32), (b, c))
        real = jnp.broadcast_to(jnp.arange(c) < n, (b, c))
        logits, _, cache = self.model.apply(params, ids, positions, real, image_features, cache=cache, index=index,
                                            decode=True, logits_at=jnp.full((b,), n - 1))
        return self._first_state(cache, logits[:, 0], index + n, jnp.full((b,), index + n), tokens, sampling, seeds,
                                 stop_ids, max_new, allowed)

    def _decode_impl(self, params, state: DecodeState, limit, sampling, seeds, stop_ids, max_new,
                     allowed=None) -> DecodeState:
        """Run decode steps until `limit` tokens exist or every row is done. allowed (packed token masks, see
        `_first_state`) constrains every step: the host passes it for one step at a time."""

        def cond(st: DecodeState):
            return (st.step < limit) & ~jnp.all(st.done)

        def body(st: DecodeState) -> DecodeState:
            s = st.step
            last = jax.lax.dynamic_index_in_dim(st.tokens, s - 1, axis=1, keepdims=True)  # [B, 1]
            pos = (st.lengths + s - 1)[:, None]
            logits, _, cache = self.model.apply(
                params, last, pos, jnp.ones_like(last, bool), cache=st.cache, index=st.start + s - 1, decode=True
            )
            tok = sample(apply_masks(logits[:, 0], allowed), row_keys(seeds, s), *sampling)
            tok = jnp.where(st.done, 0, tok)
            hit = ~st.done & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
            tokens = jax.lax.dynamic_update_index_in_dim(st.tokens, tok, s, axis=1)
            done = st.done | hit | (s + 1 >= max_new)
            return st.replace(cache=cache, tokens=tokens, step=s + 1, stopped=st.stopped | hit, done=done)

        return jax.lax.while_loop(cond, body, state)

    @staticmethod
    def _grow_impl(old, new):
        """Copy cache `old` into the first slots of the larger empty cache `new`."""
        return jax.tree_util.tree_map(lambda o, n: jax.lax.dynamic_update_slice(n, o, (0,) * n.ndim), old, new)

    # ------------------------------------------------------------------------------------ host
    def new_cache(self, batch: int, length: int) -> M.Cache:
        """An empty cache [batch, length slots] in the cache dtype, placed on the model's mesh if any."""
        check_cache_fits(self.model, batch, length, self.cache_dtype)
        cache = M.init_cache(self.model.config, batch, length, self.cache_dtype)
        if self.model.mesh is not None:
            cache = jax.device_put(cache, M.cache_shardings(self.model.mesh, cache, self.model.rules))
        return cache

    def grow(self, cache: M.Cache, length: int) -> M.Cache:
        """The cache copied into a larger one of `length` slots (the old one is consumed)."""
        return self._grow(cache, self.new_cache(cache.batch, length))

    def extend(self, cache: M.Cache, ids: np.ndarray, n: int, index: int, tokens: np.ndarray,
               settings: tuple[Any, ...], image_features: Any = None, allowed: np.ndarray | None = None) -> DecodeState:
        """Prefill chunk ids [B, C] (n real tokens, then padding) at cache slot `index` (see `_extend_impl`).
        settings = (sampling arrays, seeds, stop ids, max_new) as `settings` makes them; allowed: token masks
        for the first token (`constrain.Masks.fill`) or None. Returns the decode state; its `cache` holds the
        chunk (the given cache is consumed)."""
        return self._extend(self.model.params, cache, ids, np.int32(n), np.int32(index), tokens, *settings,
                            image_features, allowed)

    @staticmethod
    def settings(requests: Sequence[Request], stop_token_ids: Sequence[int]) -> tuple[Any, ...]:
        """(sampling arrays, seeds [B], stop ids [S], max_new [B]) as numpy arrays for the jitted functions.
        The stop ids are padded with -1 (never a token) to a power of two ≥ 8, so their number rarely
        recompiles; no stop ids: the rows stop only on their budgets."""
        ids = sorted(set(int(s) for s in stop_token_ids))
        stops = np.full(bucket(len(ids), 8), -1, np.int32)
        stops[:len(ids)] = ids
        return (SamplingParams.stack([r.sampling for r in requests]), np.asarray([r.seed for r in requests], np.uint32),
                stops, np.asarray([r.max_new_tokens for r in requests], np.int32))

    def follow(self, state: DecodeState, requests: Sequence[Request], settings: tuple[Any, ...],
               chunk: int | None = None, masks: Masks | None = None) -> Iterator[list[list[int]]]:
        """Yield, after the prefill (`state`) and after each chunk of `chunk` decode steps, the new tokens of
        every row (stop tokens dropped). Its return value (`yield from`) is (tokens per row, stopped per row,
        the final state). The decode loop is compiled before the first tokens are yielded.

        masks (`constrain.Masks`, for a batch with constrained rows; the first token was drawn under its masks):
        one step per chunk; each row's new tokens go to its matcher, the next masks to the step. A row whose
        grammar is complete, or refused a token (`masks.errors`), ends there (stopped)."""
        n = state.tokens.shape[1]
        stop_set = set(settings[2].tolist()) - {-1}
        rows: list[list[int]] = [[] for _ in requests]
        closed = [False] * len(requests)
        ended = np.zeros(len(requests), bool)  # rows ended on the host (their grammar)
        constrained = masks is not None and masks.active
        emitted, chunk = 0, 1 if constrained else chunk or n
        decode, settled = None, 0
        while True:
            step = int(to_host(state.step))
            new = to_host(state.tokens)[:, emitted:step]
            done = np.array(to_host(state.done))
            fresh_rows, newly = [], np.zeros(len(requests), bool)
            for i, r in enumerate(requests):
                fresh = []
                for j, t in enumerate(new[i].tolist()):
                    if closed[i] or emitted + j >= r.max_new_tokens or t in stop_set:
                        closed[i] = True
                        break
                    fresh.append(t)
                rows[i].extend(fresh)
                fresh_rows.append(fresh)
                if constrained and masks.matchers[i] is not None:
                    masks.feed(i, fresh)
                    if not (closed[i] or done[i] or masks.live(i)):
                        newly[i] = ended[i] = closed[i] = done[i] = True
            if newly.any():
                state = state.replace(done=state.done | jax.device_put(newly, state.done.sharding))
                settled = 0
            finished = bool(done.all()) or step >= n
            extra = () if not constrained else (masks.fill(),)
            if not finished and settled < 2:  # compile (and announce) before showing tokens; the state's signature
                # settles once decode's output is its input, so one step at a time does not re-check it every step
                decode = self._decode.executable(self.model.params, state, np.int32(0), *settings, *extra)
                settled += 1
            yield fresh_rows
            emitted = step
            if finished:
                break
            state = decode(self.model.params, state, np.int32(min(step + chunk, n)), *settings, *extra)
        stopped = to_host(state.stopped) | ended
        return rows, stopped.tolist(), state

    def stream(self, requests: Sequence[Request], stop_token_ids: Sequence[int], chunk: int | None = None,
               max_len: int | None = None) -> Stream:
        """A `Stream` that yields, after each chunk of decode steps, the new tokens of every row (stop tokens
        dropped); once exhausted, its `result` is one `Generation` per request.

        `stop_token_ids` may be empty: the rows then end only at their `max_new_tokens`.
        """
        return Stream(self._stream(requests, stop_token_ids, chunk, max_len))

    def _stream(self, requests: Sequence[Request], stop_token_ids: Sequence[int], chunk: int | None,
                max_len: int | None) -> Iterator[list[list[int]]]:
        """`stream`'s chunks; its return value (`StopIteration.value`) is one `Generation` per request."""
        cfg = self.model.config
        if not requests:
            raise ValueError("no prompts given: pass at least one prompt")
        prompts = []
        for i, r in enumerate(requests):
            p = np.asarray(r.prompt, dtype=np.int64).reshape(-1)
            if p.size == 0:
                raise ValueError(f"prompt {i} is empty")
            if p.min() < 0 or p.max() >= cfg.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {p.min()}..{p.max()}")
            if r.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be ≥ 1, got {r.max_new_tokens} for prompt {i}")
            prompts.append(p)
        longest = max(len(p) for p in prompts)
        most_new = max(r.max_new_tokens for r in requests)
        if max_len is not None and longest + most_new > max_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({most_new}) exceeds the cache length {max_len}")
        if cfg.max_length is not None and longest + most_new > cfg.max_length:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({most_new}) exceeds max_position_embeddings "
                             f"({cfg.max_length})")
        c, n = self.model.prefill_chunk, bucket(most_new)
        if c < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {c}")
        chunked = longest > c  # else one prefill call of a power-of-two bucket
        tp = -(-longest // c) * c if chunked else bucket(longest)
        b = len(prompts)
        ids = np.full((b, tp), cfg.pad_token_id, np.int32)
        mask = np.zeros((b, tp), np.int32)
        for i, p in enumerate(prompts):
            ids[i, tp - len(p):] = p
            mask[i, tp - len(p):] = 1
        settings = self.settings(requests, stop_token_ids)
        masks = Masks([r.grammar for r in requests], cfg.vocab_size)
        allowed = masks.fill() if masks.active else None
        features = self.model.request_image_features([r.prompt for r in requests], [r.images for r in requests]) \
            if any(len(r.images) for r in requests) else None
        tokens = np.zeros((b, n), np.int32)
        if not chunked:
            state = self._prefill(self.model.params, ids, mask, self.new_cache(b, tp + n), tokens, *settings, features,
                                  allowed)
        else:
            state = self._prefill_chunks(ids, mask, self.new_cache(b, cache_slots(tp + n, c)), tokens, settings, features,
                                         allowed)
        rows, stopped, _ = yield from self.follow(state, requests, settings, chunk, masks)
        return [Generation(rows[i], "error" if masks.errors[i] else "stop" if stopped[i] else "length", len(prompts[i]),
                           masks.errors[i]) for i in range(b)]

    def _chunks(self, ids: np.ndarray, mask: np.ndarray, features: Any = None,
                skip_padding: bool = True) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """Cut ids, mask [B, Tp] (Tp a multiple of `model.prefill_chunk`) into chunks: yields (start, the chunk's
        arguments (ids [B, C], mask [B, C], before [B], index, image features)), with a progress bar on stderr
        (`model.verbose`). before: each row's real tokens in earlier chunks. features [M, D]: the batch's image
        features in `[IMG]` order (row by row); each chunk gets the rows of its own `[IMG]` tokens.
        skip_padding: leave out chunks that are padding in every row (except the last)."""
        c = self.model.prefill_chunk
        b, tp = ids.shape
        img = self.model.vision_config.image_token_index if features is not None else None
        order = np.cumsum((ids == img) & (mask > 0)).reshape(b, tp) if img is not None else None  # [B, Tp]
        with prefill_bar(self.model, int(mask.sum()), tp // c) as bar:
            for start in range(0, tp, c):
                part = mask[:, start:start + c]
                if skip_padding and not part.any() and start + c < tp:
                    continue
                feats = None
                if order is not None:
                    here = (ids[:, start:start + c] == img) & (part > 0)
                    rows = order[:, start:start + c][here] - 1  # global [IMG] order, row-major
                    feats = jnp.take(features, jnp.asarray(np.pad(rows, (0, bucket(len(rows)) - len(rows)))), axis=0)
                before = mask[:, :start].sum(-1).astype(np.int32)
                yield start, (ids[:, start:start + c], part, before, np.int32(start), feats)
                bar.update(int(part.sum()))

    def _prefill_chunks(self, ids: np.ndarray, mask: np.ndarray, cache: M.Cache, tokens: np.ndarray,
                        settings: tuple[Any, ...], features: Any = None, allowed: Any = None) -> DecodeState:
        """Prefill left-padded prompts ids, mask [B, Tp] chunk by chunk into `cache` (`_chunks`, `_logits_impl`:
        the program `logits(..., last=)` runs too) -> the decode state, its first token sampled from the last
        chunk's logits."""
        logits = None
        for _, args in self._chunks(ids, mask, features):
            logits, cache = self._logits[True](self.model.params, cache, *args)
        return self._start(cache, logits[:, 0], np.int32(ids.shape[1]), mask.sum(-1).astype(np.int32), tokens,
                           *settings, allowed)

    def _logits_impl(self, params, cache, ids, mask, before, index, image_features=None, *, last_only: bool):
        """One chunk ids, mask [B, C] (any padding) into cache slots index..index+C-1, attending to the cache
        before it and to itself (`model.forward(decode=True)`); before [B]: each row's real tokens in the
        earlier chunks (its positions go on from there) -> (logits [B, C, X], or of the chunk's last token
        [B, 1, X] with `last_only`; the cache with the chunk written)."""
        positions = before[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        logits, _, cache = self.model.apply(params, ids, positions, mask.astype(bool), image_features, cache=cache,
                                            index=index, decode=True, last_only=last_only)
        return logits, cache

    def chunked_logits(self, ids: np.ndarray, mask: np.ndarray, last: int | None = None,
                       features: Any = None) -> np.ndarray:
        """float32 logits [B, T, X] (or of the last `last` positions, [B, last, X]) of ids, mask [B, T] (any
        padding), computed chunk by chunk over a cache (`model.prefill_chunk` tokens at a time): device memory
        holds one chunk's logits, never [T, X]; only the positions asked for come back to the host."""
        c = self.model.prefill_chunk
        b, t = ids.shape
        tp = -(-t // c) * c
        pad = tp - t  # right padding up to whole chunks
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=self.model.config.pad_token_id)
        mask = np.pad(mask, ((0, 0), (0, pad)))
        first = 0 if last is None else t - last  # the first position asked for
        cache = self.new_cache(b, cache_slots(tp, c))
        out = []
        for start, args in self._chunks(ids, mask, features, skip_padding=False):
            wanted = start + c > first
            logits, cache = self._logits[not wanted](self.model.params, cache, *args)
            if wanted:
                out.append(to_host(logits[:, max(0, first - start):min(c, t - start)]))
        return np.concatenate(out, axis=1)

    def generate(self, requests: Sequence[Request], stop_token_ids: Sequence[int], max_len: int | None = None) -> list[Generation]:
        """Run every request to completion and return one `Generation` per request, in order."""
        stream = self.stream(requests, stop_token_ids, max_len=max_len)
        for _ in stream:
            pass
        return stream.result
