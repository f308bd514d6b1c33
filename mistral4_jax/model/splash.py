"""Prefill attention as one fused TPU kernel: JAX's Pallas splash attention (causal, query/key dims 192,
value dims 128), per batch row and attention-head shard.

XLA's blockwise attention (`layers._attend`) writes every [heads, T, block] score tile to HBM and reads it
back: on TPU v5e-16, a 4,096-token chunk of the real model moves ~1.6 GB per layer that way. The kernel
keeps the tiles on chip (84 MB per layer: q, k, v and the output) and skips the key blocks above the
diagonal. On CPU it runs in Pallas' interpreter (slow; for tests).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..sharding import DEFAULT_RULES, ShardingRules, mesh_platform

Array = jax.Array
ATTN_BACKENDS = ("auto", "xla", "splash")
_BLOCK = 128  # the kernel's query and key block


def resolve_attn_backend(backend: str, qk_dim: int, v_dim: int, mesh: Any = None) -> str:
    """"xla" or "splash" for `backend` in `ATTN_BACKENDS`; "auto" = "splash" on TPU for head dims that are
    multiples of 64 (the model's 192 and 128), else "xla"."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(ATTN_BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    return "splash" if mesh_platform(mesh) == "tpu" and qk_dim % 64 == 0 and v_dim % 64 == 0 else "xla"


def _kernel(heads: int, tokens: int, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as sk,
                                                                  splash_attention_mask as sm)
    mask = sm.MultiHeadMask([sm.CausalMask((tokens, tokens)) for _ in range(heads)])
    return sk.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_causal_attention(q: Array, k: Array, v: Array, key_valid: Array, mesh: Any = None,
                            rules: ShardingRules = DEFAULT_RULES) -> Array:
    """softmax(q k^T) v, causal among the T tokens, a padding key (key_valid False) seen only by padding
    queries; the scale is already in q.

    q, k [B, T, N, H]; v [B, T, N, V]; key_valid [B, T] bool -> [B, T, N, V] (q's dtype). T is padded to a
    multiple of 128 for the kernel. With a `mesh`, each (batch, heads) shard of `rules` runs its own kernel.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t = key_valid.shape
    pad = -t % _BLOCK
    qkv = [jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for a in (q, k, v)]  # [B, N, T', .]
    segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, pad)))  # 1 = token, 0 = padding
    interpret = mesh_platform(mesh) == "cpu"

    def run(q: Array, k: Array, v: Array, seg: Array) -> Array:
        kernel = _kernel(q.shape[1], q.shape[2], interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(q, k, v, seg)

    if mesh is not None:
        rows, heads = rules.get("batch"), rules.get("heads")
        rows = rows if rows and b % mesh.shape[rows] == 0 else None
        heads = heads if heads and q.shape[2] % mesh.shape[heads] == 0 else None
        spec = P(rows, heads, None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                            check_vma=False)
    out = run(*qkv, segments)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
