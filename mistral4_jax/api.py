"""The public entry points: `load(path)` and the `Mistral4` model object."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Mistral4Config
from . import model as M

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float8_e4m3fn": jnp.float8_e4m3fn}


def resolve_dtype(dtype: Any, what: str = "dtype") -> Any:
    """A jnp dtype from a name ("float32", "bfloat16", "float16", "float8_e4m3fn") or a dtype.

    "float8_e4m3fn" as a storage dtype means the model's FP8 format (FP8 weights with float32 scales).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def default_compute_dtype(dtype: Any) -> Any:
    """float32 on CPU (XLA's CPU bf16 matmuls are ~30x slower); the storage dtype on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else dtype


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of each token = number of real tokens before it (left or right padding): [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@dataclasses.dataclass
class ChatResult:
    """One chat answer: the reasoning (between [THINK] and [/THINK]) and the content after it."""

    reasoning: str
    content: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int]


class Mistral4:
    """A loaded Mistral 4 text model: config, parameters (a pytree of jax arrays) and jitted functions.

    `dtype` is the storage dtype of the parameters, `compute_dtype` the dtype of activations.
    `mesh`: a ("data", "expert", "tensor") mesh (`sharding.make_mesh`) to shard the parameters over
    (placed by the rules table; experts run expert-parallel); None = one device.
    `layer_loop`: "scan" runs the stacked layers under `lax.scan` (compile time flat in depth; the
    default), "unroll" unstacks them into per-layer arrays and unrolls the loop (faster weight reads
    on CPU decode, compile time grows with depth).
    """

    def __init__(self, config: Mistral4Config, params: Any, dtype: Any = jnp.float32, compute_dtype: Any = None,
                 mesh: Any = None, layer_loop: str = "scan") -> None:
        if layer_loop not in ("scan", "unroll"):
            raise ValueError(f"layer_loop must be 'scan' or 'unroll', got {layer_loop!r}")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        if mesh is not None:
            from .sharding import param_shardings

            params = jax.device_put(params, param_shardings(config, mesh, self.dtype))
        self.params = M.unstack_layers(params) if layer_loop == "unroll" else params
        self.compute_dtype = resolve_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype(self.dtype)
        self.mesh = mesh
        self.layer_loop = layer_loop
        self.tokenizer: Any = None
        self._forward = jax.jit(self._forward_impl, static_argnames=("last_only",))

    def apply(self, params: Any, input_ids: jax.Array, positions: jax.Array, key_valid: jax.Array, **kwargs: Any):
        """`model.forward` with this model's config, dtypes and mesh bound (for use inside jitted code)."""
        return M.forward(params, self.config, input_ids, positions, key_valid, dtype=self.compute_dtype,
                         param_dtype=self.dtype, mesh=self.mesh, **kwargs)

    def _forward_impl(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, last_only: bool = False):
        positions = positions_from_mask(attention_mask)
        logits, expert_ids, _ = self.apply(params, input_ids, positions, attention_mask.astype(bool), last_only=last_only)
        return logits, expert_ids

    def _check_inputs(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a non-empty integer array [batch, tokens], got {ids.dtype}{list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values {ids.min()}..{ids.max()}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int32)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)} like input_ids")
        return ids.astype(np.int32), mask.astype(np.int32)

    def forward(self, input_ids: Any, attention_mask: Any = None, last_only: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """(logits [B, T or 1, vocab] float32, routed expert ids [moe_layers, B, T, K] or None), as jax arrays."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        return self._forward(self.params, ids, mask, last_only=last_only)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """float32 logits [B, T, vocab] as a numpy array. input_ids [B, T] (or [T]); attention_mask 1 = token, 0 = padding."""
        return np.asarray(self.forward(input_ids, attention_mask)[0])

    @property
    def generator(self):
        """The compiled prefill/decode functions (built on first use, reused by every call)."""
        if getattr(self, "_generator", None) is None:
            from .generate import Generator

            self._generator = Generator(self)
        return self._generator

    def _requests(self, prompts: Any, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  min_p: float, seed: int | Sequence[int]) -> list:
        from .generate import Request
        from .sampling import SamplingParams

        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"seed has {len(seeds)} entries for {len(prompts)} prompts")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return [Request(list(p), max_new_tokens, sampling, s) for p, s in zip(prompts, seeds)]

    def generate(self, prompts: Any, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | Sequence[int] = 0,
                 stop_token_ids: Sequence[int] | None = None) -> list:
        """Generate for a batch of token-id prompts (lists of different lengths are fine).

        temperature 0 is greedy; top_k 0 and top_p 1 and min_p 0 switch those filters off. `seed` is
        one int (row i uses seed + i) or one per prompt; the same seed gives the same tokens.
        stop_token_ids default to the config's eos ids. Returns one `Generation` (tokens without the
        stop token, finish_reason "stop"/"length", prompt_tokens) per prompt, in order.
        """
        requests = self._requests(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed)
        stops = self.config.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        return self.generator.generate(requests, stops)

    def chat(self, messages: Any, reasoning_effort: str | None = None, max_new_tokens: int = 512,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             seed: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None) -> Any:
        """Answer one conversation (a list of OpenAI-style messages) or a batch of them.

        Messages are encoded exactly as mistral-common does (`reasoning_effort` "none" or "high" for
        models that support it). Returns a `ChatResult` (reasoning, content, token counts, finish
        reason) for one conversation, or a list of them for a batch.
        """
        from .tokenizer import split_reasoning

        tok = self.require_tokenizer()
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        if not conversations:
            raise ValueError("messages must be a conversation (list of dicts) or a non-empty list of conversations")
        prompts = [tok.encode_chat(conv, reasoning_effort=reasoning_effort) for conv in conversations]
        stops = (tok.eos_id,) if stop_token_ids is None else tuple(stop_token_ids)
        gens = self.generate(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stops)
        results = []
        for g in gens:
            reasoning, content = split_reasoning(g.tokens, tok)
            results.append(ChatResult(reasoning, content, g.prompt_tokens, len(g.tokens), g.finish_reason, g.tokens))
        return results[0] if single else results

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load a directory with tekken.json or tokenizer.json, "
                             "or set model.tokenizer = Tokenizer.from_dir(...)")
        return self.tokenizer

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))


def load(path: str | os.PathLike, dtype: Any = "float32", compute_dtype: Any = None, mesh: Any = None,
         shardings: Any = None, layer_loop: str = "scan") -> Mistral4:
    """Load a model from a converted checkpoint (`mistral4-jax convert`, has a manifest.json) or from an HF
    checkpoint directory (config.json + safetensors).

    dtype: storage dtype of the parameters ("float32", "bfloat16", "float16", or "float8_e4m3fn" for the
    FP8 weights of a checkpoint converted with `--dtype float8_e4m3fn`); a converted checkpoint is cast
    (FP8 dequantised) while it is read. compute_dtype defaults to float32 on CPU and to `dtype` elsewhere
    (bfloat16 for FP8 weights).
    mesh: the device mesh the model runs on (`sharding.make_mesh`). shardings: where each parameter is
    placed while loading, as `checkpoint.restore_params` accepts (one `Sharding`, a tree of them, or a
    callable (logical axes, ShapeDtypeStruct) -> Sharding); default: the layout of `sharding.RULES` on
    `mesh` if given, else the default device. A converted checkpoint is restored straight into them.
    layer_loop: see `Mistral4`. The tokenizer (tekken.json or tokenizer.json in `path`) is attached
    as `model.tokenizer` when present.
    """
    from . import checkpoint, hf

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    jdtype = resolve_dtype(dtype)
    converted = checkpoint.is_checkpoint(path)
    if not converted and M.is_fp8(jdtype):
        raise ValueError(f"{path}: FP8 weights load from a converted checkpoint: "
                         f"run `mistral4-jax convert {path} DST --dtype float8_e4m3fn` first")
    config = checkpoint.read_config(path) if converted else Mistral4Config.from_json(os.path.join(path, "config.json"))
    if shardings is None and mesh is not None:
        from .sharding import param_shardings

        shardings = param_shardings(config, mesh, jdtype)
    if converted:
        config, params = checkpoint.restore_params(path, jdtype, shardings)
    else:
        params = hf.read_params(path, config, np.dtype(jdtype))
        if shardings is None:
            params = jax.device_put(params)
        else:
            abstract = M.abstract_params(config, jdtype)
            params = jax.device_put(params, checkpoint.resolve_shardings(shardings, config, jdtype, abstract))
    log.info("loaded %s (%d layers) from %s", type(config).__name__, config.num_hidden_layers, path)
    if compute_dtype is None and M.is_fp8(jdtype):
        compute_dtype = default_compute_dtype(jnp.bfloat16)
    model = Mistral4(config, params, dtype=jdtype, compute_dtype=compute_dtype, mesh=mesh, layer_loop=layer_loop)
    model.tokenizer = _find_tokenizer(path)
    return model


def _find_tokenizer(path: str) -> Any:
    """The tokenizer stored in `path`, or None (with a warning if one is there but cannot be read)."""
    from .tokenizer import Tokenizer

    if not any(os.path.exists(os.path.join(path, n)) for n in ("tekken.json", "tokenizer.json")):
        return None
    try:
        return Tokenizer.from_dir(path)
    except (ImportError, ValueError, FileNotFoundError) as e:
        log.warning("%s: tokenizer not loaded (%s)", path, e)
        return None
