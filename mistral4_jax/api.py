"""The `Mistral4` model object (the facade over config, parameters and jitted functions); `weights.load`
builds one from a checkpoint directory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M
from .config import Mistral4Config
from .distributed import to_host
from .model.vision import check_image_token_count, image_features, param_axes as vision_param_axes
from .model.vision_packing import num_image_tokens
from .serve.chat import has_image_parts
from .serve.chat.grammar import chat_grammar, check_response_format
from .serve.chat.session import ChatSession, chat_result
from .serve.generate import PREFILL_CHUNK, Generator, Request, bucket
from .serve.image import ImageProcessor, describe
from .serve.sampling import SamplingParams
from .model import param_shardings
from .sharding import DEFAULT_RULES, ShardingRules, mesh_platform, tree_shardings

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


class Mistral4:
    """A loaded Mistral 4 model: config, parameters (a pytree of jax arrays) and jitted functions.

    `dtype` is the storage dtype of the parameters, `compute_dtype` the dtype of activations.
    `mesh`: a ("data", "expert", "tensor") mesh (`sharding.make_mesh`) to shard the parameters over
    (experts run expert-parallel); None = one device.
    `rules`: the `sharding.ShardingRules` that lay out parameters, cache, batch, the expert-parallel MoE
    and the vision tower on `mesh` (None = `sharding.DEFAULT_RULES`); kept as `model.rules`.
    `shardings`: where the parameters go, a `Sharding` or a tree of them matching `params`; None = the
    rules' layout on `mesh` (`param_shardings`), or where they are without a mesh. Arrays already placed
    there are not copied (so `weights.load(..., shardings=)` keeps the placement it restored into).
    `layer_loop`: "scan" runs the stacked layers under `lax.scan` (compile time flat in depth),
    "unroll" unstacks them into per-layer arrays and unrolls the loop (compile time grows with depth;
    on CPU much faster, because XLA:CPU copies each layer's weights out of the stack where the scan
    reads them). "auto" (the default): "unroll" on CPU without a mesh, else "scan".
    `moe_backend`: the routed experts' kernel (`model.routed_experts`): "loop" (a traced loop over the
    chosen experts, fastest on CPU) or "ragged" (static shapes: grouped matmuls, or for decode a slice of
    each chosen expert); "auto" (the default) = "loop" on CPU, "ragged" on TPU/GPU. Same results.
    `vision_config` / `vision_params`: the Pixtral tower + Mistral 3 projector (`vision.VisionConfig`, the
    tree of `vision.read_vision_params` / `vision.init_params`), or None for a text-only model. Images
    (`logits(..., images=)`, `generate(..., images=)`, image parts in `chat`) need them.
    `verbose` (default True): print a line on stderr whenever generation compiles a new shape ("compiling
    prefill for batch 1 x 64 tokens, 320-slot cache (first use of this shape)... 21.3 s"), so that the
    first call of each shape does not wait in silence; set `model.verbose = False` to silence them.
    """

    verbose: bool = True
    prefill_chunk: int
    """Prompt tokens per prefill call: a longer prompt (up to max_position_embeddings) is prefilled in chunks that
    attend to the cache written so far, so its memory grows with chunk x context, not context^2
    (`serve.generate.Generator`). Default by platform (`serve.generate.PREFILL_CHUNK`: 512 on CPU, 4,096 on
    TPU/GPU); a setting: `model.prefill_chunk = 1024`."""

    def __init__(self, config: Mistral4Config, params: Any, dtype: Any = jnp.float32, compute_dtype: Any = None,
                 mesh: Any = None, layer_loop: str = "auto", vision_config: Any = None, vision_params: Any = None,
                 moe_backend: str = "auto", rules: ShardingRules | None = None, shardings: Any = None) -> None:
        if layer_loop not in ("auto", "scan", "unroll"):
            raise ValueError(f"layer_loop must be 'auto', 'scan' or 'unroll', got {layer_loop!r}")
        self.moe_backend = M.resolve_moe_backend(moe_backend, mesh)
        if layer_loop == "auto":
            layer_loop = "unroll" if mesh is None and jax.default_backend() == "cpu" else "scan"
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.rules = DEFAULT_RULES if rules is None else rules
        if shardings is None and mesh is not None:
            floats = M.stored_float_weights(config, params)
            shardings = param_shardings(config, mesh, self.dtype, self.rules, float_weights=floats)
        if shardings is not None:
            params = jax.device_put(params, shardings)
        self.params = M.unstack_layers(params) if layer_loop == "unroll" else params
        self.compute_dtype = resolve_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype(self.dtype)
        self.mesh = mesh
        self.prefill_chunk = PREFILL_CHUNK.get(mesh_platform(mesh), 2048)
        self.layer_loop = layer_loop
        self.tokenizer: Any = None
        self._forward = jax.jit(self._forward_impl, static_argnames=("last_only",))
        if (vision_config is None) != (vision_params is None):
            raise ValueError("vision_config and vision_params must be given together (or neither, for a text-only model)")
        self.vision_config = vision_config
        self.vision_params: Any = None
        self.image_processor: Any = None
        if vision_config is not None:
            if vision_config.text_hidden_size != config.hidden_size:
                raise ValueError(f"vision config text_hidden_size ({vision_config.text_hidden_size}) differs from the "
                                 f"text model's hidden_size ({config.hidden_size})")
            if not 0 <= vision_config.image_token_index < config.vocab_size:
                raise ValueError(f"image_token_index {vision_config.image_token_index} is outside the vocabulary "
                                 f"[0, {config.vocab_size})")
            placement = None
            if mesh is not None:  # by the rules; the default lists no vision axes: replicated (the tower is small)
                placement = tree_shardings(mesh, vision_param_axes(vision_config), self.rules, "vision/")
            self.vision_params = jax.device_put(vision_params, placement)
            self.image_processor = ImageProcessor.from_vision_config(vision_config)

    # ------------------------------------------------------------------------------------------- images
    @property
    def has_vision(self) -> bool:
        return self.vision_config is not None

    def require_vision(self, what: str = "images") -> None:
        if self.vision_config is None:
            raise ValueError(f"{what}: this model has no vision tower (a text-only checkpoint, or one converted or "
                             "loaded with text_only); images cannot be used")

    def pixel_values(self, images: Any) -> list[np.ndarray]:
        """Preprocessed pixel arrays [3, H, W] of a list of images: `image.ProcessedImage`s, float pixel
        arrays [3, H, W] (taken as already preprocessed), or image sources (paths, bytes, data URIs, PIL
        images, uint8 arrays), preprocessed with `self.image_processor` (transformers' resize).
        ValueError naming the image for bad input or a model without a vision tower."""
        self.require_vision()
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        c = self.vision_config.num_channels
        for i, x in enumerate(images):
            if hasattr(x, "pixel_values") and hasattr(x, "token_ids"):
                x = x.pixel_values
            elif not (isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 3 and np.shape(x)[0] == c
                      and np.issubdtype(np.asarray(x).dtype, np.floating)):
                x = self.image_processor.preprocess(x, f"{i} ({describe(x)})").pixel_values
            out.append(np.asarray(x, np.float32))
        return out

    def image_features(self, images: Any) -> jax.Array:
        """Image embeddings [M, hidden] (compute dtype) of a list of images (see `pixel_values`), in order:
        row m replaces the m-th `[IMG]` token of the prompt."""
        return image_features(self.vision_params, self.vision_config, self.pixel_values(images), dtype=self.compute_dtype)

    def request_image_features(self, prompts: Sequence[Any], images: Sequence[Any]) -> jax.Array:
        """Features of every prompt's images, prompts in order (batch rows), padded to `generate.bucket` rows;
        ValueError naming the prompt when its `[IMG]` tokens and its images' features differ in number."""
        self.require_vision()
        if len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts (one list per prompt)")
        pixels: list[np.ndarray] = []
        idx = self.vision_config.image_token_index
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            px = self.pixel_values(list(imgs or ()))
            n_feat = sum(int(np.prod(num_image_tokens(x.shape[1], x.shape[2], self.vision_config))) for x in px)
            n_tok = int(np.sum(np.asarray(prompt) == idx))
            if n_tok != n_feat:
                raise ValueError(f"prompt {i}: {n_tok} [IMG] tokens (id {idx}) but its {len(px)} image(s) give {n_feat} "
                                 "image features (more images than [IMG] slots, or a token layout that does not match "
                                 "the images)")
            pixels.extend(px)
        feats = self.image_features(pixels) if pixels else jnp.zeros((0, self.config.hidden_size), self.compute_dtype)
        pad = bucket(feats.shape[0]) - feats.shape[0]
        return jnp.pad(feats, ((0, pad), (0, 0)))

    def apply(self, params: Any, input_ids: jax.Array, positions: jax.Array, key_valid: jax.Array,
              image_features: jax.Array | None = None, **kwargs: Any):
        """`model.forward` with this model's config, dtypes and mesh bound (for use inside jitted code);
        image_features [M, D] (or None) replace the `[IMG]` tokens (this model's image_token_index), in order."""
        if image_features is not None:
            kwargs.update(image_features=image_features, image_token_index=self.vision_config.image_token_index)
        return M.forward(params, self.config, input_ids, positions, key_valid, dtype=self.compute_dtype,
                         mesh=self.mesh, moe_backend=self.moe_backend, rules=self.rules, **kwargs)

    def _forward_impl(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, last_only: bool = False,
                      image_features: jax.Array | None = None):
        positions = positions_from_mask(attention_mask)
        logits, expert_ids, _ = self.apply(params, input_ids, positions, attention_mask.astype(bool), image_features,
                                           last_only=last_only)
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

    def forward(self, input_ids: Any, attention_mask: Any = None, last_only: bool = False,
                images: Any = None) -> tuple[jax.Array, jax.Array | None]:
        """(logits [B, T or 1, vocab] float32, routed expert ids [moe_layers, B, T, K] or None), as jax arrays.

        images: for a model with a vision tower, the images of the whole batch in prompt order (row 0's
        images, then row 1's, ...; see `pixel_values` for the accepted kinds); their features replace the
        `[IMG]` tokens in order. Their number of features must equal the number of `[IMG]` tokens."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        feats = self._batch_image_features(ids, images)
        if feats is None:
            return self._forward(self.params, ids, mask, last_only=last_only)
        feats = jnp.pad(feats, ((0, bucket(feats.shape[0]) - feats.shape[0]), (0, 0)))
        return self._forward(self.params, ids, mask, last_only=last_only, image_features=feats)

    def _batch_image_features(self, ids: np.ndarray, images: Any) -> jax.Array | None:
        """Features [M, D] of a batch's images (see `forward`), checked against the `[IMG]` tokens of ids [B, T];
        None without images."""
        if images is None or (isinstance(images, (list, tuple)) and not images):
            return None
        self.require_vision()
        feats = self.image_features(images)
        check_image_token_count(ids, feats.shape[0], self.vision_config.image_token_index)
        return feats

    def logits(self, input_ids: Any, attention_mask: Any = None, images: Any = None, last: int | None = None) -> np.ndarray:
        """float32 logits [B, T, vocab] as a numpy array. input_ids [B, T] (or [T]); attention_mask 1 = token,
        0 = padding; images: see `forward`. `last`: only the last `last` positions, [B, last, vocab].
        Inputs longer than `prefill_chunk` run chunk by chunk over a cache (up to max_position_embeddings
        tokens; `Generator.chunked_logits`): device memory holds one chunk's logits, never [T, vocab]."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        t = ids.shape[1]
        if last is not None and not 1 <= last <= t:
            raise ValueError(f"last must be between 1 and the input length {t}, got {last}")
        if self.config.max_length is not None and t > self.config.max_length:
            raise ValueError(f"input of {t} tokens exceeds max_position_embeddings ({self.config.max_length})")
        if t <= self.prefill_chunk:
            out = to_host(self.forward(ids, mask, images=images)[0])
            return out if last is None else out[:, t - last:]
        return self.generator.chunked_logits(ids, mask, last, self._batch_image_features(ids, images))

    def loss(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, int]:
        """(mean next-token cross-entropy over the labels that are not -100, the number of those tokens), as
        transformers' `Mistral4ForCausalLM(labels=...)` computes it (labels shifted inside; see
        `model.causal_lm_loss`, the jittable, differentiable function beside `forward` for training code).
        input_ids, labels [B, T] (or [T]); attention_mask 1 = token, 0 = padding (right padding for training)."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        lab = np.asarray(labels)
        lab = lab[None] if lab.ndim == 1 else lab
        if lab.shape != ids.shape or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integers shaped like input_ids {list(ids.shape)}, got {lab.dtype}{list(lab.shape)}")
        if ((lab != M.IGNORE_INDEX) & ((lab < 0) | (lab >= self.config.vocab_size))).any():
            raise ValueError(f"labels must lie in [0, {self.config.vocab_size}) or be {M.IGNORE_INDEX} (not learned)")
        if getattr(self, "_loss", None) is None:
            self._loss = jax.jit(lambda p, i, l, m: M.causal_lm_loss(p, self.config, i, l, m, dtype=self.compute_dtype,
                                                                     mesh=self.mesh, rules=self.rules))
        value, tokens = self._loss(self.params, ids, lab.astype(np.int32), mask)
        return float(to_host(value)), int(to_host(tokens))

    @property
    def generator(self):
        """The compiled prefill/decode functions (built on first use, reused by every call)."""
        if getattr(self, "_generator", None) is None:
            self._generator = Generator(self)
        return self._generator

    def _requests(self, prompts: Any, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  min_p: float, seed: int | Sequence[int], images: Any = None, grammars: Any = None) -> list:
        single = isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], (int, np.integer))
        if single:
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"seed has {len(seeds)} entries for {len(prompts)} prompts")
        if images is None:
            images = [()] * len(prompts)
        else:
            if single and (not isinstance(images, (list, tuple)) or not images or not isinstance(images[0], (list, tuple))):
                images = [images]  # one prompt: a flat list of its images
            if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
                raise ValueError(f"images must hold one list of images per prompt ({len(prompts)} prompts)")
            images = [[] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x]) for x in images]
            if any(images):
                self.require_vision()
        grammars = [None] * len(prompts) if grammars is None else list(grammars)
        if len(grammars) != len(prompts):
            raise ValueError(f"grammars has {len(grammars)} entries for {len(prompts)} prompts")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return [Request(list(p), max_new_tokens, sampling, s, tuple(im), g)
                for p, s, im, g in zip(prompts, seeds, images, grammars)]

    def generate(self, prompts: Any, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | Sequence[int] = 0,
                 stop_token_ids: Sequence[int] | None = None, images: Any = None, grammars: Any = None) -> list:
        """Generate for a batch of token-id prompts (lists of different lengths are fine).

        temperature 0 is greedy; top_k 0 and top_p 1 and min_p 0 switch those filters off. `seed` is
        one int (row i uses seed + i) or one per prompt; the same seed gives the same tokens.
        stop_token_ids default to the config's eos ids; [] means no stop token (rows end at max_new_tokens).
        images: one list of images per prompt (for one
        prompt, its list), each prompt's `[IMG]` tokens filled in order (see `pixel_values`). grammars: one
        `serve.constrain.Grammar` or None per prompt (constrained decoding; `chat` builds them). Returns one
        `Generation` (tokens without the stop token, finish_reason "stop"/"length"/"error", prompt_tokens) per
        prompt.
        """
        requests = self._requests(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, images, grammars)
        stops = self.config.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        return self.generator.generate(requests, stops)

    def chat(self, messages: Any, reasoning_effort: str | None = None, max_new_tokens: int = 512,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             seed: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None, tools: Any = None,
             tool_choice: Any = "auto", response_format: Any = None, parallel_tool_calls: bool = True) -> Any:
        """Answer one conversation (a list of OpenAI-style messages) or a batch of them.

        Messages are encoded exactly as mistral-common does (`reasoning_effort` "none" or "high" for
        models that support it). User messages may hold images as OpenAI-style parts
        (`{"type": "image_url", "image_url": {"url": path | file:// | data URI}}` or `{"type": "image",
        "image": PIL image | bytes | path | uint8 array}`) for a model with a vision tower (see
        `encode_chat`). tools: OpenAI-style function definitions (`chat.tools`); the history may hold
        assistant `tool_calls` and `tool` messages with a `tool_call_id`.
        tool_choice: "auto" (the model decides; unconstrained), "required" (one or more calls of the tools),
        {"type": "function", "function": {"name": ...}} (calls of that function), "none" (text only);
        parallel_tool_calls=False: at most one call per constrained answer.
        response_format: None / {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}} (a JSON answer valid under the schema).
        All but "auto" and text are enforced by constrained decoding (`chat.grammar`): the model can only
        write what the grammar allows, call arguments valid under each tool's parameters schema.
        Returns a `ChatResult` (reasoning, content, tool calls, token counts, finish reason) for one
        conversation, or a list of them for a batch; a malformed call or a JSON answer cut off by
        max_new_tokens is reported in `ChatResult.error` (finish_reason "error"), never raised; bad requests
        (unknown tool names, invalid schemas, tool messages without a matching call) raise ValueError before
        anything runs. stop_token_ids default to the tokenizer's eos; [] means none. For a conversation that
        goes on turn after turn, `chat_session` keeps its cache between turns.
        """
        tok = self.require_tokenizer()
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        if not conversations:
            raise ValueError("messages must be a conversation (list of dicts) or a non-empty list of conversations")
        encoded = [self.encode_chat(conv, reasoning_effort=reasoning_effort, tools=tools, tool_choice=tool_choice)
                   for conv in conversations]
        grammar = chat_grammar(tok, tools, tool_choice, response_format, reasoning_effort, parallel_tool_calls)
        prompts, images = [e[0] for e in encoded], [e[1] for e in encoded]
        stops = (tok.eos_id,) if stop_token_ids is None else tuple(stop_token_ids)
        gens = self.generate(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stops,
                             images=images if any(images) else None, grammars=[grammar] * len(prompts))
        json_answer = check_response_format(response_format) is not None
        results = [chat_result(tok, g, json_answer=json_answer) for g in gens]
        return results[0] if single else results

    def chat_session(self, system: str | None = None, reasoning_effort: str | None = None, max_new_tokens: int = 512,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
                     stop_token_ids: Sequence[int] | None = None, **kwargs: Any) -> ChatSession:
        """A multi-turn conversation that keeps its KV cache between turns: `session.send("...")` returns a
        `ChatResult` and prefills only the new turn (see `chat.ChatSession`; kwargs: `prefill_chunk`,
        `min_cache`, and `tools`, `tool_choice`, `parallel_tool_calls`, `response_format` for every turn)."""
        return ChatSession(self, system, reasoning_effort, max_new_tokens, temperature, top_k, top_p, min_p, seed,
                           stop_token_ids, **kwargs)

    def encode_chat(self, messages: Any, reasoning_effort: str | None = None, continue_final_message: bool = False,
                    tools: Any = None, tool_choice: Any = "auto") -> tuple[list[int], list[Any]]:
        """(prompt ids, preprocessed images in `[IMG]` order) of one conversation, through the tokenizer's
        `encode_chat_with_images` (mistral-common's ids; pixels from `image.ImageProcessor`). ValueError
        for images with a text-only model, or a tokenizer whose image layout does not fit the vision tower."""
        tok = self.require_tokenizer()
        if not has_image_parts(messages):
            return tok.encode_chat(messages, reasoning_effort=reasoning_effort, continue_final_message=continue_final_message,
                                   tools=tools, tool_choice=tool_choice), []
        self.require_vision("image parts in the messages")
        ids, images = tok.encode_chat_with_images(messages, reasoning_effort=reasoning_effort,
                                                  continue_final_message=continue_final_message,
                                                  image_processor=self.image_processor, tools=tools,
                                                  tool_choice=tool_choice)
        v = self.vision_config
        proc = tok.image_processor(self.image_processor)
        if proc.merged_patch_size != v.merged_patch_size or proc.image_token_id != v.image_token_index:
            raise ValueError(f"the tokenizer's image layout (patch {proc.patch_size} x merge {proc.spatial_merge_size}, "
                             f"[IMG] id {proc.image_token_id}) does not fit the vision tower (patch {v.patch_size} x "
                             f"merge {v.spatial_merge_size}, image_token_index {v.image_token_index})")
        return ids, images

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load a directory with tekken.json or tokenizer.json, "
                             "or set model.tokenizer = Tokenizer.from_dir(...)")
        return self.tokenizer

    def num_params(self) -> int:
        """Parameters of the text model and, if loaded, the vision tower and projector."""
        trees = [self.params] + ([self.vision_params] if self.vision_params is not None else [])
        return sum(int(np.prod(x.shape)) for t in trees for x in jax.tree_util.tree_leaves(t))
