"""Batched generation: one jitted prefill, then a jitted on-device decode loop over the latent KV cache.

Prompts of different lengths share a batch by left padding to a bucketed length (powers of two from
16), so every row writes its next token into the same cache slot and a new prompt length does not
always recompile. The decode loop (`lax.while_loop`) samples on device, checks stop tokens and
per-row token budgets on device, and donates the cache: no host round trip per token. Streaming runs
the same loop in chunks of `chunk` tokens and yields what each chunk produced.

What recompiles: the batch size, the prompt bucket, the new-token bucket (power of two ≥ 16) and the
number of stop ids. Sampling settings, seeds and `max_new_tokens` within a bucket do not.

Images (`Request.images`, a model with a vision tower): before prefill, the images of all rows are run
through the vision tower and projector together (`Mistral4.request_image_features`, its own jitted function,
compiled per packed-patch bucket); the features, padded to a power of two ≥ 16 rows (one more recompile
key), replace the `[IMG]` token embeddings in prefill, rows in batch order. Decode is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M
from .distributed import to_host
from .sampling import SamplingParams, row_keys, sample

if TYPE_CHECKING:
    from .api import Mistral4

log = logging.getLogger(__name__)


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two ≥ max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class Generation:
    """One row's result: generated token ids (without the stop token), and why it ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    prompt_tokens: int


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


def _state_shardings(mesh: Any, state: dict[str, Any]) -> Any:
    from .sharding import cache_shardings

    return cache_shardings(mesh, state)


class Generator:
    """Compiled prefill/decode functions for one model; reused across calls (compiles once per bucket)."""

    def __init__(self, model: Mistral4, cache_dtype: Any = None) -> None:
        self.model = model
        self.cache_dtype = cache_dtype or model.compute_dtype
        self._prefill = jax.jit(self._prefill_impl, donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_impl, donate_argnames=("state",))

    # ---------------------------------------------------------------------------------- jitted
    def _prefill_impl(self, params, ids, mask, cache, sampling, seeds, stop_ids, max_new, image_features=None):
        """ids, mask [B, Tp] (left padded) -> decode state with the first token sampled.
        image_features [M, D] (or None) replace the `[IMG]` token embeddings, in order."""
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        extra = {} if image_features is None else {"image_features": image_features,
                                                    "image_token_index": self.model.vision_config.image_token_index}
        logits, _, cache = self.model.apply(params, ids, positions, mask.astype(bool), cache=cache, index=0,
                                            last_only=True, **extra)
        tok = sample(logits[:, 0], row_keys(seeds, 0), *sampling)
        b, n = ids.shape[0], cache["valid"].shape[1] - ids.shape[1]
        stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        return {
            "cache": cache,
            "tokens": jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok),
            "step": jnp.int32(1),
            "lengths": mask.sum(-1).astype(jnp.int32),
            "stopped": stopped,
            "done": stopped | (max_new <= 1),
        }

    def _decode_impl(self, params, state, limit, sampling, seeds, stop_ids, max_new):
        """Run decode steps until `limit` tokens exist or every row is done."""
        prompt_len = state["cache"]["valid"].shape[1] - state["tokens"].shape[1]

        def cond(st):
            return (st["step"] < limit) & ~jnp.all(st["done"])

        def body(st):
            s = st["step"]
            last = jax.lax.dynamic_index_in_dim(st["tokens"], s - 1, axis=1, keepdims=True)  # [B, 1]
            pos = (st["lengths"] + s - 1)[:, None]
            logits, _, cache = self.model.apply(
                params, last, pos, jnp.ones_like(last, bool), cache=st["cache"], index=prompt_len + s - 1, decode=True
            )
            tok = sample(logits[:, 0], row_keys(seeds, s), *sampling)
            tok = jnp.where(st["done"], 0, tok)
            hit = ~st["done"] & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
            tokens = jax.lax.dynamic_update_index_in_dim(st["tokens"], tok, s, axis=1)
            done = st["done"] | hit | (s + 1 >= max_new)
            return {**st, "cache": cache, "tokens": tokens, "step": s + 1, "stopped": st["stopped"] | hit, "done": done}

        return jax.lax.while_loop(cond, body, state)

    # ------------------------------------------------------------------------------------ host
    def stream(self, requests: Sequence[Request], stop_token_ids: Sequence[int], chunk: int | None = None,
               max_len: int | None = None) -> Iterator[list[list[int]]]:
        """Yield, after each chunk of decode steps, the new tokens of every row (stop tokens dropped).

        Once the iterator is exhausted, `self.last_results` holds one `Generation` per request.
        """
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
        if not stop_token_ids:
            raise ValueError("stop_token_ids is empty; pass at least one id (eos by default)")
        longest = max(len(p) for p in prompts)
        most_new = max(r.max_new_tokens for r in requests)
        tp, n = bucket(longest), bucket(most_new)
        if max_len is not None and longest + most_new > max_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({most_new}) exceeds the cache length {max_len}")
        if cfg.max_length is not None and longest + most_new > cfg.max_length:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({most_new}) exceeds max_position_embeddings "
                             f"({cfg.max_length})")
        b = len(prompts)
        ids = np.full((b, tp), cfg.pad_token_id, np.int32)
        mask = np.zeros((b, tp), np.int32)
        for i, p in enumerate(prompts):
            ids[i, tp - len(p):] = p
            mask[i, tp - len(p):] = 1
        sampling = tuple(jnp.asarray(a) for a in SamplingParams.stack([r.sampling for r in requests]))
        seeds = jnp.asarray([r.seed for r in requests], jnp.uint32)
        stops = jnp.asarray(sorted(set(int(s) for s in stop_token_ids)), jnp.int32)
        max_new = jnp.asarray([r.max_new_tokens for r in requests], jnp.int32)
        features = self.model.request_image_features([r.prompt for r in requests], [r.images for r in requests]) \
            if any(len(r.images) for r in requests) else None
        cache = M.init_cache(cfg, b, tp + n, self.cache_dtype)
        if self.model.mesh is not None:
            cache = jax.device_put(cache, _state_shardings(self.model.mesh, cache))
        state = self._prefill(self.model.params, ids, mask, cache, sampling, seeds, stops, max_new, features)
        stop_set = set(np.asarray(stops).tolist())
        rows: list[list[int]] = [[] for _ in requests]
        closed = [False] * b
        emitted, chunk = 0, chunk or n
        while True:
            step = int(to_host(state["step"]))
            new = to_host(state["tokens"])[:, emitted:step]
            fresh_rows = []
            for i, r in enumerate(requests):
                fresh = []
                for j, t in enumerate(new[i].tolist()):
                    if closed[i] or emitted + j >= r.max_new_tokens or t in stop_set:
                        closed[i] = True
                        break
                    fresh.append(t)
                rows[i].extend(fresh)
                fresh_rows.append(fresh)
            yield fresh_rows
            emitted = step
            if bool(to_host(state["done"]).all()) or step >= n:
                break
            state = self._decode(self.model.params, state, jnp.int32(min(step + chunk, n)), sampling, seeds, stops, max_new)
        stopped = to_host(state["stopped"])
        self.last_results = [Generation(rows[i], "stop" if stopped[i] else "length", len(prompts[i])) for i in range(b)]

    def generate(self, requests: Sequence[Request], stop_token_ids: Sequence[int], max_len: int | None = None) -> list[Generation]:
        """Run every request to completion and return one `Generation` per request, in order."""
        for _ in self.stream(requests, stop_token_ids, max_len=max_len):
            pass
        return self.last_results
