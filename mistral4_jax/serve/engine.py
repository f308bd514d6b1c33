"""Continuous batching: a fixed number of decode rows over one latent cache, requests joining and leaving.

    engine = Engine(model, rows=8, max_context=4096)
    results = engine.run([Request(prompt_ids, max_new_tokens=64), ...])   # offline, or:
    engine.start(); job = engine.submit(request, on_tokens=print); job.wait()  # a server's thread

Layout. The cache has `rows` rows of `slots` slots and ONE write slot `index` shared by all rows, as offline
decoding (`generate.Generator`): each decode step writes every live row's token at `index` and moves it on,
each row at its own position. A new request is prefilled alone (batch 1, the offline prefill programs: chunk by
chunk for a long prompt, one chunk per engine step, so the other rows keep decoding meanwhile) into a small
cache, which is then copied into a free row ending at `index` (`_insert`; the rest of the row is cleared). A row's
keys are therefore its prompt and its tokens in order, with gaps of invalid slots where `index` moved before it
came; attention is masked by validity and rope uses the row's own positions, so where the keys sit does not
change the row's numbers: greedy rows give the tokens offline `generate` gives, whatever else runs beside them.
When `index` would pass the end, `_compact` packs each live row's keys to end at the smallest index that holds
the longest (one gather of the cache); `slots` = max_context + slack, so that happens at most once per `slack`
steps.

A step (`step`): take new requests and cancellations, end what was cancelled or timed out (its row is free at
once), admit waiting requests into free rows (prefill; at most `prefill_budget` prompt tokens per step while
other rows decode), then run up to `steps_per_call` decode steps on device (fewer when a row ends while a request
waits for a row; one while a row is constrained: its grammar's masks come from the host, as in
`Generator.follow`), and hand each request its new tokens.

Multi-host (`sync`): every process runs the same engine on the same steps. Process 0 takes the requests; before
each step it broadcasts what is new (requests, cancellations, shutdown) to all processes (`broadcast_events`), so
every process makes the same decisions and runs the same programs.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ..distributed import to_host
from .constrain import Grammar, Masks, apply as apply_masks
from .generate import Generation, Request, bucket
from .sampling import SamplingParams, row_keys, sample

if TYPE_CHECKING:
    from ..api import Mistral4


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is full (a server answers 429)."""


class ShuttingDown(RuntimeError):
    """The engine no longer takes requests (a server answers 503)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One submitted request and what became of it. `on_tokens(ids)` gets each batch of new tokens (stop
    tokens dropped) from the engine's thread; `result` is set (and `on_done(result)` called) once it ends: a
    `Generation` whose finish_reason is "stop", "length", "error" (its grammar refused a token, its images do
    not fit its prompt), "cancelled" (`Engine.cancel`) or "timeout" (past its `deadline`)."""

    request: Request
    id: int
    on_tokens: Callable[[list[int]], None] | None = None
    on_done: Callable[[Generation], None] | None = None
    deadline: float | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    result: Generation | None = None
    ended: str | None = None
    """"cancelled" or "timeout" once the engine has been told (the request ends at the next step)."""
    masks: Masks | None = None
    _done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> Generation | None:
        """The result, once the request has ended (None if `timeout` passed first)."""
        self._done.wait(timeout)
        return self.result


@dataclasses.dataclass
class Stats:
    """Counters for metrics: requests by how they ended, tokens, and the engine's current load."""

    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    compactions: int = 0
    waiting: int = 0
    live_rows: int = 0
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4096))
    """(time, tokens) of the latest decode calls."""

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds."""
        since = time.monotonic() - window
        return sum(n for t, n in self.recent if t >= since) / window


@dataclasses.dataclass
class _Filling:
    """A long prompt being prefilled chunk by chunk into its own 1-row cache."""

    job: Job
    row: int
    ids: np.ndarray
    mask: np.ndarray
    settings: tuple[Any, ...]
    chunks: Any
    cache: Any
    logits: Any = None


class Engine:
    """Continuous batching over `rows` decode rows of one cache (module docstring).

    max_context: the longest prompt + max_new_tokens a request may ask for (≤ max_position_embeddings).
    steps_per_call: decode steps per device call (tokens reach the requests after each call).
    max_queue: requests waiting for a row beyond this are refused (`QueueFull`).
    prefill_budget: prompt tokens prefilled per engine step while other rows decode (default: the model's
    `prefill_chunk`); a longer prompt is prefilled one chunk per step.
    stop_token_ids: tokens that end a request (default the config's eos ids).
    sync: the multi-host broadcast (`broadcast_events`), None on one host.
    """

    def __init__(self, model: Mistral4, rows: int = 8, max_context: int | None = None, steps_per_call: int = 8,
                 max_queue: int = 256, prefill_budget: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, sync: Callable[[list], list] | None = None) -> None:
        cfg = model.config
        limit = cfg.max_length or 1 << 20
        max_context = min(max_context or min(limit, 4096), limit)
        if rows < 1 or steps_per_call < 1 or max_context < 2:
            raise ValueError(f"rows ({rows}), steps_per_call ({steps_per_call}) must be ≥ 1 and max_context "
                             f"({max_context}) ≥ 2")
        self.model, self.gen = model, model.generator
        self.rows, self.max_context, self.steps_per_call, self.max_queue = rows, max_context, steps_per_call, max_queue
        self.prefill_budget = prefill_budget or model.prefill_chunk
        slack = max(steps_per_call, max_context // 4)
        self.slots = -(-max(max_context + slack, self._prompt_slots(max_context - 1)) // 64) * 64
        self.stops = self.gen.settings([Request([0])], cfg.eos_token_ids if stop_token_ids is None
                                       else stop_token_ids)[2]
        self._stop_set = set(self.stops.tolist()) - {-1}
        self.sync = sync
        self.stats = Stats()
        self.cache = self.gen.new_cache(rows, self.slots)
        self.index = 0
        b = rows
        self.job: list[Job | None] = [None] * b
        self.masks: list[Masks | None] = [None] * b
        self.tok, self.pos, self.count = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        self.used = np.zeros(b, np.int32)  # valid slots of each row (its prompt + tokens written)
        self.live = np.zeros(b, bool)
        self.sampling = SamplingParams.stack([SamplingParams()] * b)
        self.seeds, self.max_new = np.zeros(b, np.uint32), np.zeros(b, np.int32)
        self.waiting: collections.deque[Job] = collections.deque()
        self.filling: _Filling | None = None  # a long prompt's prefill, chunk by chunk
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._closing = False  # shutdown() was called: submit refuses
        self._closed = False  # the close event went through a step (on every process alike): the loop may end
        self._thread: threading.Thread | None = None
        self._step_fn = jax.jit(self._step_impl, donate_argnames=("cache",))
        self._insert_fn = jax.jit(self._insert_impl, donate_argnames=("cache",))
        self._compact_fn = jax.jit(self._compact_impl, donate_argnames=("cache",))

    # ------------------------------------------------------------------------------------ jitted
    def _step_impl(self, params, cache, tok, pos, count, live, index, limit, refill, sampling, seeds, max_new, stops,
                   allowed=None):
        """Up to `limit` decode steps (fewer once no row is live, or, with `refill`, once a row has ended: a request
        waits for it) from slot `index`: each live row feeds its last token tok [B] at position pos [B] and draws
        its token number count [B] (its key: `row_keys(seed, count)`, as offline). -> (cache, tokens
        [B, steps_per_call] (-1 where a row drew nothing), tok, pos, count, live, steps taken)."""
        b, k = tok.shape[0], self.steps_per_call
        started = live

        def cond(c):
            return (c[-1] < limit) & jnp.any(c[4]) & ~(refill & jnp.any(started & ~c[4]))

        def body(c):
            cache, tok, pos, count, live, out, s = c
            logits, _, cache = self.model.apply(params, tok[:, None], pos[:, None], live[:, None], cache=cache,
                                                index=index + s, decode=True)
            new = sample(apply_masks(logits[:, 0], allowed), row_keys(seeds, count), *sampling)
            hit = jnp.any(new[:, None] == stops[None, :], axis=-1)
            out = jax.lax.dynamic_update_index_in_dim(out, jnp.where(live, new, -1), s, axis=1)
            count = count + live
            return (cache, jnp.where(live, new, tok), pos + live, count, live & ~hit & (count < max_new), out, s + 1)

        init = (cache, tok, pos, count, live, jnp.full((b, k), -1, jnp.int32), jnp.int32(0))
        cache, tok, pos, count, live, out, s = jax.lax.while_loop(cond, body, init)
        return cache, out, tok, pos, count, live, s

    @staticmethod
    def _insert_impl(cache, part, row, index):
        """Row `row` of `cache` cleared and the 1-row cache `part` (W slots) copied into its slots index-W..index-1."""
        w = part.slots
        valid = jnp.where(jnp.arange(cache.batch)[:, None] == row, False, cache.valid)
        valid = jax.lax.dynamic_update_slice(valid, part.valid, (row, index - w))
        groups = {name: jax.tree.map(lambda g, p: jax.lax.dynamic_update_slice(g, p.astype(g.dtype), (0, row, index - w, 0)),
                                     g, part.groups[name]) for name, g in cache.groups.items()}
        return cache.replace(valid=valid, groups=groups)

    @staticmethod
    def _compact_impl(cache, keep, end):
        """Each row's valid slots packed, in order, to end at slot `end` (rows where keep [B] is False cleared)."""
        valid = cache.valid & keep[:, None]
        s = valid.shape[1]
        n = valid.sum(-1, keepdims=True)  # [B, 1]
        order = jnp.argsort(~valid, axis=-1, stable=True)  # valid slots first, in order
        k = jnp.arange(s)[None, :] - (end - n)  # new slot j holds the row's k-th valid key
        ok = (k >= 0) & (k < n)
        src = jnp.take_along_axis(order, jnp.clip(k, 0, s - 1), axis=-1)  # [B, S]
        groups = {name: jax.tree.map(lambda a: jnp.take_along_axis(a, src[None, :, :, None], axis=2), g)
                  for name, g in cache.groups.items()}
        return cache.replace(valid=ok, groups=groups)

    # ------------------------------------------------------------------------------------- requests
    def _prompt_slots(self, n: int) -> int:
        """Cache slots of a prefilled prompt of n tokens (left padded to the prefill programs' bucket)."""
        c = self.model.prefill_chunk
        return -(-n // c) * c if n > c else bucket(n)

    def check(self, request: Request) -> None:
        """ValueError naming what is wrong with a request this engine cannot run."""
        p = np.asarray(request.prompt, dtype=np.int64).reshape(-1)
        v = self.model.config.vocab_size
        if p.size == 0:
            raise ValueError("the prompt is empty")
        if p.min() < 0 or p.max() >= v:
            raise ValueError(f"prompt token ids must lie in [0, {v}), got {p.min()}..{p.max()}")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {request.max_new_tokens}")
        if p.size + request.max_new_tokens > self.max_context:
            raise ValueError(f"the prompt ({p.size} tokens) + max_tokens ({request.max_new_tokens}) exceeds the "
                             f"context this server was started with ({self.max_context})")
        if len(request.images) and not self.model.has_vision:
            raise ValueError("images were given but this model has no vision tower (a text-only checkpoint)")

    def submit(self, request: Request, on_tokens: Callable[[list[int]], None] | None = None,
               on_done: Callable[[Generation], None] | None = None, timeout: float | None = None) -> Job:
        """Queue a request (checked first: ValueError); QueueFull when `max_queue` requests wait already,
        ShuttingDown after `shutdown`. `timeout` (seconds): the request ends with an error after it."""
        self.check(request)
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self.stats.waiting + self._inbox.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are waiting already")
        job = Job(request, next(self._ids), on_tokens, on_done,
                  None if timeout is None else time.monotonic() + timeout)
        self._inbox.put(("job", job))
        return job

    def cancel(self, job: Job) -> None:
        """End a request (a client that went away): its row is freed at the next step."""
        self._inbox.put(("cancelled", job))

    # ------------------------------------------------------------------------------------------ loop
    @property
    def closing(self) -> bool:
        """Shutting down: no new requests are taken."""
        return self._closing

    @property
    def busy(self) -> bool:
        return bool(self.live.any() or self.waiting or self.filling)

    def step(self, wait: float = 0.0) -> None:
        """One engine step (module docstring). `wait`: seconds to wait for a request when there is nothing to do."""
        events = []
        try:
            if not self.busy and wait > 0:
                events.append(self._inbox.get(timeout=wait))
            while True:
                events.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()  # deadlines are decided here (process 0), so every process ends the same requests
        events += [("timeout", j) for j in self._jobs() if j.deadline is not None and now > j.deadline and not j.ended]
        if self.sync is not None:
            events = self.sync(events)
        for kind, job in events:
            if kind == "job":
                self.waiting.append(job)
            elif kind in ("cancelled", "timeout") and job is not None:  # None: it ended already (other processes)
                job.ended = job.ended or kind
            elif kind == "close":
                self._closing = self._closed = True
        self._expire()
        self._admit()
        if self.live.any():
            self._decode()
        self.stats.waiting, self.stats.live_rows = len(self.waiting), int(self.live.sum())

    def warmup(self) -> None:
        """Compile the first prompt bucket's prefill, the insert and the decode step (every process alike)."""
        sync, self.sync = self.sync, None
        try:
            self.run([Request([self.model.config.bos_token_id or 1], 2)])
        finally:
            self.sync = sync

    def run(self, requests: Sequence[Request]) -> list[Generation]:
        """Run requests to completion on this thread (no server): one `Generation` each, in order."""
        jobs = [self.submit(r) for r in requests]
        while not all(j.result is not None for j in jobs):
            self.step()
        return [j.result for j in jobs]

    def start(self) -> None:
        """Run the engine on a background thread (`serve_forever`)."""
        self._thread = threading.Thread(target=self.serve_forever, name="mistral4-jax-engine", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Steps until shut down and nothing is left to do."""
        while not (self._closed and not self.busy):
            self.step(wait=0.05)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests; let those in flight finish for up to `timeout` seconds, then cancel the rest."""
        self._closing = True
        self._inbox.put(("close", None))
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                for job in self._jobs():
                    self.cancel(job)
                self._thread.join(max(5.0, deadline - time.monotonic()))

    def _jobs(self) -> list[Job]:
        return [j for j in self.job if j is not None] + list(self.waiting) + ([self.filling.job] if self.filling else [])

    # --------------------------------------------------------------------------------------- internals
    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        job.result = Generation(job.tokens, reason, len(job.request.prompt), error)
        self.stats.finished[reason] += 1
        if job.on_done is not None:
            job.on_done(job.result)
        job._done.set()

    def _free(self, row: int) -> None:
        self.job[row], self.masks[row], self.live[row] = None, None, False

    def _expire(self) -> None:
        """End cancelled and timed-out requests, wherever they are."""
        def end(j: Job) -> None:
            if j.ended == "cancelled":
                self._finish(j, "cancelled")
            else:
                self._finish(j, "timeout", f"the request timed out after {j.deadline - j.submitted:.1f} s")

        for j in [j for j in self.waiting if j.ended]:
            self.waiting.remove(j)
            end(j)
        if self.filling is not None and self.filling.job.ended:
            end(self.filling.job)
            self.job[self.filling.row] = None
            self.filling = None
        for r, j in enumerate(self.job):
            if j is not None and j.ended:
                self._free(r)
                end(j)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows: up to `prefill_budget` prompt tokens while rows decode
        (all that fit when none do); a chunked prefill goes on one chunk per step."""
        budget = self.prefill_budget
        while True:
            if self.filling is not None:
                budget -= self._fill_chunk()
                if self.filling is not None:
                    return
                continue
            free = [r for r in range(self.rows) if self.job[r] is None]
            if not free or not self.waiting or (budget <= 0 and self.live.any()):
                return
            job = self.waiting.popleft()
            budget -= self._prefill(job, free[0])

    def _prefill(self, job: Job, row: int) -> int:
        """Start a request in `row`: its prompt prefilled (or the first chunk of a long one) -> prompt slots."""
        r, gen, cfg = job.request, self.gen, self.model.config
        p = np.asarray(r.prompt, np.int32)
        tp = self._prompt_slots(len(p))
        ids = np.full((1, tp), cfg.pad_token_id, np.int32)
        mask = np.zeros((1, tp), np.int32)
        ids[0, tp - len(p):], mask[0, tp - len(p):] = p, 1
        settings = gen.settings([r], self.stops)
        job.masks = Masks([r.grammar], cfg.vocab_size) if r.grammar is not None else None
        try:
            feats = self.model.request_image_features([r.prompt], [r.images]) if len(r.images) else None
        except ValueError as e:
            self._finish(job, "error", str(e))
            return 0
        self.job[row] = job  # the row is taken from now on
        if tp > self.model.prefill_chunk:
            self.filling = _Filling(job, row, ids, mask, settings, iter(gen._chunks(ids, mask, feats)),
                                    gen.new_cache(1, tp))
            return self._fill_chunk()
        allowed = job.masks.fill() if job.masks is not None else None
        state = gen._prefill(self.model.params, ids, mask, gen.new_cache(1, tp), np.zeros((1, 1), np.int32),
                             *settings, feats, allowed)
        self._place(job, row, state, len(p))
        return tp

    def _fill_chunk(self) -> int:
        """One chunk of a long prompt's prefill (`filling`); after the last, the request takes its row.
        -> prompt tokens prefilled."""
        f, gen = self.filling, self.gen
        try:
            _, args = next(f.chunks)
        except StopIteration:
            allowed = f.job.masks.fill() if f.job.masks is not None else None
            state = gen._start(f.cache, f.logits[:, 0], np.int32(f.ids.shape[1]), f.mask.sum(-1).astype(np.int32),
                               np.zeros((1, 1), np.int32), *f.settings, allowed)
            self.filling = None
            self._place(f.job, f.row, state, int(f.mask.sum()))
            return 0
        f.logits, f.cache = gen._logits[True](self.model.params, f.cache, *args)
        return self.model.prefill_chunk

    def _place(self, job: Job, row: int, state: Any, n: int) -> None:
        """Copy a prefilled request (`state`: its 1-row decode state) into `row`, ending at the write slot."""
        w = state.cache.slots
        if self.index < w:
            self.index = w  # the other rows get a gap of invalid slots
        if self.index + self.steps_per_call > self.slots:
            self._compact(extra=w)
        self.cache = self._insert_fn(self.cache, state.cache, np.int32(row), np.int32(self.index))
        first = int(to_host(state.tokens)[0, 0])
        r = job.request
        self.stats.prompt_tokens += n
        self.tok[row], self.pos[row], self.count[row], self.used[row] = first, n, 1, n
        t, k, p, m = SamplingParams.stack([r.sampling])
        for dst, src in zip(self.sampling, (t, k, p, m)):
            dst[row] = src[0]
        self.seeds[row], self.max_new[row] = r.seed, r.max_new_tokens
        self.masks[row] = job.masks
        self.live[row] = True
        self._deliver(row, [first])

    def _compact(self, extra: int = 0) -> None:
        """Pack the live rows' keys to end at the lowest write slot that holds them (and `extra` slots)."""
        keep = np.array([j is not None for j in self.job])
        end = max([int(self.used[r]) for r in range(self.rows) if keep[r]] + [extra, 0])
        self.cache = self._compact_fn(self.cache, keep, np.int32(end))
        self.index = end
        self.stats.compactions += 1

    def _decode(self) -> None:
        constrained = any(self.masks[r] is not None and self.live[r] for r in range(self.rows))
        limit = 1 if constrained else self.steps_per_call
        if self.index + limit > self.slots:
            self._compact()
        allowed = None
        if constrained:
            words = -(-self.model.config.vocab_size // 32)
            allowed = np.full((self.rows, words), -1, np.int32)
            for r, m in enumerate(self.masks):
                if m is not None and self.live[r] and m.live(0):
                    allowed[r] = m.fill()[0]
        out = self._step_fn(self.model.params, self.cache, self.tok, self.pos, self.count, self.live,
                            np.int32(self.index), np.int32(limit), np.bool_(bool(self.waiting)), self.sampling,
                            self.seeds, self.max_new, self.stops,
                            allowed)
        self.cache = out[0]
        tokens, tok, pos, count, _, steps = (to_host(x) for x in out[1:])
        steps = int(steps)
        self.index += steps
        self.stats.decode_steps += steps
        was_live = self.live.copy()
        self.tok, self.pos, self.count = tok.copy(), pos.copy(), count.copy()
        self.stats.recent.append((time.monotonic(), int((tokens[:, :steps] >= 0).sum())))
        for r in np.nonzero(was_live)[0]:
            new = [int(t) for t in tokens[r, :steps] if t >= 0]
            self.used[r] += len(new)
            self._deliver(int(r), new)

    def _deliver(self, row: int, new: list[int]) -> None:
        """Hand a row's new tokens to its request; end the request (and free the row) at a stop token, its
        budget, or its grammar's end."""
        job, masks = self.job[row], self.masks[row]
        fresh, reason, error = [], None, None
        for t in new:
            if t in self._stop_set:
                reason = "stop"
                break
            fresh.append(t)
        if masks is not None:
            masks.feed(0, fresh)
            if masks.errors[0] is not None:
                reason, error = "error", masks.errors[0]
            elif masks.complete[0] and reason is None:
                reason = "stop"
        if fresh:
            if job.first_token is None:
                job.first_token = time.monotonic()
            job.tokens.extend(fresh)
            self.stats.generated_tokens += len(fresh)
            if job.on_tokens is not None:
                job.on_tokens(fresh)
        if reason is None and len(job.tokens) >= job.request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._free(row)
            self._finish(job, reason, error)


# ----------------------------------------------------------------------------------------- multi-host
class HostSync:
    """`Engine.sync` for a multi-host system: process 0's events of a step, the same on every process
    (`multihost_utils.broadcast_one_to_all`, one byte buffer). A request crosses as JSON (prompt, settings, seed,
    the grammar's Lark text, images as float32 pixels); other processes rebuild it (the grammar with their own
    tokenizer) as a job without callbacks: only process 0 answers clients."""

    def __init__(self, model: Mistral4) -> None:
        self.model = model
        self.jobs: dict[int, Job] = {}  # on processes > 0: the jobs by process 0's id

    def __call__(self, events: list) -> list:
        from jax.experimental import multihost_utils

        main = jax.process_index() == 0
        payload = json.dumps([self._encode(kind, job) for kind, job in events]).encode() if main else b""
        size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
        buf = np.frombuffer(payload, np.uint8) if main else np.zeros(size, np.uint8)
        data = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)))
        return events if main else [self._decode(e) for e in json.loads(data.decode())]

    @staticmethod
    def _encode(kind: str, job: Job | None) -> dict[str, Any]:
        if kind != "job":
            return {"kind": kind, "id": None if job is None else job.id}
        r = job.request
        images = [np.asarray(getattr(x, "pixel_values", x), np.float32) for x in r.images]
        return {"kind": kind, "id": job.id, "prompt": [int(t) for t in r.prompt], "max_new_tokens": r.max_new_tokens,
                "sampling": dataclasses.asdict(r.sampling), "seed": int(r.seed),
                "grammar": None if r.grammar is None else r.grammar.lark,
                "images": [{"shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()} for x in images]}

    def _decode(self, e: dict[str, Any]) -> tuple[str, Job | None]:
        if e["kind"] != "job":
            return e["kind"], self.jobs.pop(e["id"], None) if e["kind"] != "close" else None
        grammar = None
        if e["grammar"] is not None:
            from .chat.grammar import factory

            grammar = Grammar(e["grammar"], factory(self.model.require_tokenizer()).llg_tokenizer)
        images = tuple(np.frombuffer(base64.b64decode(x["data"]), np.float32).reshape(x["shape"]) for x in e["images"])
        request = Request(e["prompt"], e["max_new_tokens"], SamplingParams(**e["sampling"]), e["seed"], images, grammar)
        job = self.jobs[e["id"]] = Job(request, e["id"], on_done=lambda _, i=e["id"]: self.jobs.pop(i, None))
        return "job", job
