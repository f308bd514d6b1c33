"""Typed configuration of the Mistral 4 text decoder.

`Mistral4Config` holds the architecture only: no mesh, no dtypes, no runtime settings. It is read from
an HF `config.json` (`model_type` "mistral4", or the `text_config` of a "mistral3" multimodal config)
or from one of our own `configs/*.json` files (the same field names), and validated on construction:
a config that does not fit raises a `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from .activations import check_activation

_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional")
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}
"""rope_parameters keys that transformers requires per rope type (beyond those we default as it does)."""


@dataclasses.dataclass(frozen=True)
class Mistral4Config:
    """Architecture of the Mistral 4 text decoder (field names follow HF's `Mistral4Config`).

    The one derived numeric choice is `softmax_scale`: HF multiplies `qk_head_dim ** -0.5` by the square of
    the YaRN `mscale(factor, mscale_all_dim)` when the rope type is not "default" and `mscale_all_dim` is
    non-zero (0.19497 for the released config). `from_hf_dict` computes it exactly as HF does; a config
    file may set it explicitly (e.g. to the plain `qk_head_dim ** -0.5`) and then that value is used.

    `hidden_act` is any parameter-free activation of transformers' `ACT2FN` (see `activations.py`). Rope
    types are those of its `ROPE_INIT_FUNCTIONS` that its Mistral 4 runs (see `model.rope_inv_freq`); the
    HF `rope_parameters` keys map to `rope_theta`, `rope_factor` (factor), `original_max_position_embeddings`,
    `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`, `rope_truncate` (truncate), `rope_attention_factor`
    (attention_factor; yarn, longrope: None derives it), `rope_low_freq_factor` / `rope_high_freq_factor`
    (llama3), `rope_short_factor` / `rope_long_factor` (longrope), `partial_rotary_factor` (proportional
    only; None: all rope dims) and `llama_4_scaling_beta`.
    """

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    num_experts_per_tok: int = 4
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    q_lora_rank: int | None = 1024
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_interleave: bool = True
    rope_type: str = "yarn"
    rope_theta: float = 10000.0
    rope_factor: float = 128.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    partial_rotary_factor: float | None = None
    llama_4_scaling_beta: float | None = 0.1
    max_position_embeddings: int = 1048576
    softmax_scale: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | tuple[int, ...] = 2
    pad_token_id: int = 11

    def __post_init__(self) -> None:
        if self.softmax_scale is None:
            object.__setattr__(self, "softmax_scale", self.hf_softmax_scale())
        for name in ("eos_token_id", "rope_short_factor", "rope_long_factor"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def max_length(self) -> int | None:
        """The longest sequence generation accepts: `max_position_embeddings`, or None with "dynamic" rope,
        which (as in transformers) starts scaling at `max_position_embeddings` instead of stopping there."""
        return None if self.rope_type == "dynamic" else self.max_position_embeddings

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return tuple(e) if isinstance(e, tuple) else (e,)

    def hf_softmax_scale(self) -> float:
        """The attention softmax scale as HF's `yarn_apply_mscale` computes it."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type != "default" and self.mscale_all_dim:
            m = yarn_get_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    # ------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `ValueError` naming the first field that is missing a sensible value or is inconsistent."""
        positive = [
            "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "original_max_position_embeddings", "max_position_embeddings",
        ]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {v!r}")
        for name in ("qk_nope_head_dim", "first_k_dense_replace", "n_shared_experts", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"config field {name!r} must be a non-negative integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"config field 'q_lora_rank' must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"config field 'qk_rope_head_dim' must be even for rope, got {self.qk_rope_head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                f"'n_routed_experts' ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"config field 'n_group' ({self.n_group}) does not divide 'n_routed_experts' ({self.n_routed_experts})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"config field 'topk_group' ({self.topk_group}) exceeds 'n_group' ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ValueError(f"config field 'n_group' ({self.n_group}) leaves fewer than 2 experts per group")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in "
                f"'topk_group' ({self.topk_group}) groups of {per_group}"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"config field 'first_k_dense_replace' ({self.first_k_dense_replace}) exceeds "
                f"'num_hidden_layers' ({self.num_hidden_layers})"
            )
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ValueError("config field 'intermediate_size' must be positive when first_k_dense_replace > 0")
        check_activation("hidden_act", self.hidden_act)
        self.validate_rope()
        if not self.rope_theta > 0:
            raise ValueError(f"config field 'rope_theta' must be positive, got {self.rope_theta!r}")
        if not (isinstance(self.softmax_scale, (int, float)) and self.softmax_scale > 0):
            raise ValueError(f"config field 'softmax_scale' must be a positive number, got {self.softmax_scale!r}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            ids = getattr(self, name)
            for i in ids if isinstance(ids, tuple) else (ids,):
                if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    raise ValueError(f"config field {name!r} ({ids!r}) is outside the vocabulary [0, {self.vocab_size})")

    def validate_rope(self) -> None:
        """The rope fields: what transformers' Mistral 4 can run (it ropes exactly qk_rope_head_dim dims)."""
        t, r = self.rope_type, self.qk_rope_head_dim
        if t not in _ROPE_TYPES:
            raise ValueError(f"config field 'rope_type' must be one of {_ROPE_TYPES}, got {t!r}")
        if t != "default" and not self.rope_factor > 0:
            raise ValueError(f"config field 'rope_factor' must be positive for rope_type {t!r}, got {self.rope_factor!r}")
        if t == "dynamic" and r <= 2:
            raise ValueError(f"config field 'qk_rope_head_dim' must exceed 2 for dynamic rope (exponent R/(R-2)), got {r}")
        if t == "proportional":
            if self.qk_nope_head_dim:
                raise ValueError("config field 'rope_type' is 'proportional', which ropes all qk_nope_head_dim + "
                                 f"qk_rope_head_dim dims in transformers: it needs qk_nope_head_dim 0, got {self.qk_nope_head_dim}")
            if self.partial_rotary_factor is not None and not 0 <= self.partial_rotary_factor <= 1:
                raise ValueError(f"config field 'partial_rotary_factor' must lie in [0, 1], got {self.partial_rotary_factor!r}")
        if t == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                f = getattr(self, name)
                if not isinstance(f, tuple) or len(f) not in (1, r // 2):
                    raise ValueError(f"config field {name!r} must be a list of qk_rope_head_dim / 2 = {r // 2} numbers "
                                     f"for longrope, got {f!r}")

    # ----------------------------------------------------------------------------------------- readers
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Mistral4Config:
        """Build from an HF config dict: `mistral4`, or `mistral3` with a mistral4 `text_config` (a top-level
        `tie_word_embeddings` of a mistral3 dict, which is what `Mistral3ForConditionalGeneration` ties by,
        wins over the text config's)."""
        model_type = d.get("model_type")
        if model_type == "mistral3":
            if "text_config" not in d:
                raise ValueError("config field 'text_config' is missing from a mistral3 config")
            top_tie = d.get("tie_word_embeddings")
            d = d["text_config"]
            if top_tie is not None:
                d = {**d, "tie_word_embeddings": bool(top_tie)}
            model_type = d.get("model_type", "mistral4")
        if model_type != "mistral4":
            raise ValueError(f"config field 'model_type' must be 'mistral4' or 'mistral3', got {model_type!r}")
        if d.get("attention_bias", False):
            raise ValueError("config field 'attention_bias' is true; Mistral 4 has no attention biases")
        heads = d.get("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if kv_heads != heads:
            raise ValueError(f"config field 'num_key_value_heads' ({kv_heads}) must equal 'num_attention_heads' ({heads}) for MLA")
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "moe_intermediate_size"]
        for name in required:
            if d.get(name) is None:
                raise ValueError(f"config field {name!r} is missing")
        if d.get("head_dim") not in (None, d["qk_nope_head_dim"] + d["qk_rope_head_dim"]):
            raise ValueError(
                f"config field 'head_dim' ({d['head_dim']}) must equal qk_nope_head_dim + qk_rope_head_dim "
                f"({d['qk_nope_head_dim'] + d['qk_rope_head_dim']})"
            )

        kwargs: dict[str, Any] = {name: d[name] for name in HF_FIELDS if name in d}
        kwargs.update(_rope_fields(d))
        if kwargs.get("n_group") is None:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None:
            kwargs["topk_group"] = 1
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mistral4Config:
        """Our own JSON layout (the dataclass fields); an HF dict (with `model_type`) is also accepted."""
        if "model_type" in d:
            return cls.from_hf_dict(d)
        return from_fields(cls, d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Mistral4Config:
        """Read `config.json` of an HF directory, or one of our `configs/*.json` files."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `mistral4` config dict for this architecture (for building reference models in tests/demos)."""
        d = {k: v for k, v in self.to_dict().items() if k in HF_FIELDS}
        d.update(
            model_type="mistral4",
            num_key_value_heads=self.num_attention_heads,
            head_dim=self.qk_head_dim,
            rope_parameters={
                "rope_type": self.rope_type, "rope_theta": self.rope_theta, "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "mscale": self.mscale,
                "mscale_all_dim": self.mscale_all_dim, "llama_4_scaling_beta": self.llama_4_scaling_beta,
                "truncate": self.rope_truncate,
            },
        )
        optional = {"attention_factor": self.rope_attention_factor, "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_type == "llama3":
            optional.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor)
        if self.rope_type == "longrope":
            optional.update(short_factor=list(self.rope_short_factor), long_factor=list(self.rope_long_factor))
        d["rope_parameters"].update({k: v for k, v in optional.items() if v is not None})
        return d

    def replace(self, **changes: Any) -> Mistral4Config:
        """A copy with some fields changed (softmax_scale is recomputed unless given)."""
        if "softmax_scale" not in changes:
            changes["softmax_scale"] = None
        return dataclasses.replace(self, **changes)


def _rope_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Our rope fields from an HF config dict's `rope_parameters` (or legacy `rope_scaling`), with
    transformers' defaults; ValueError for what its Mistral 4 cannot run."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if rope.get(key) is None:
            raise ValueError(f"config field 'rope_parameters.{key}' is missing (rope_type {rope_type!r} needs it)")
    max_pos = d.get("max_position_embeddings", 8192)
    original = int(rope.get("original_max_position_embeddings") or max_pos)
    factor = rope.get("factor")
    if factor is None and rope_type == "longrope":
        factor = max_pos / original  # as transformers' longrope
    r, h = d["qk_rope_head_dim"], d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    prf = rope.get("partial_rotary_factor")
    rotated = int(h * (r / h if prf is None else prf))  # transformers' rope dims for all but default/proportional
    if rope_type not in ("default", "proportional") and rotated != r:
        raise ValueError(f"config field 'rope_parameters.partial_rotary_factor' ({prf}) ropes {rotated} of the "
                         f"{h} head dims; Mistral 4 ropes exactly qk_rope_head_dim ({r})")
    return dict(
        rope_type=rope_type,
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rope_factor=float(factor or 1.0),
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=float(rope.get("mscale") or 0.0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        rope_truncate=bool(rope.get("truncate", True)),
        rope_attention_factor=rope.get("attention_factor"),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_short_factor=rope.get("short_factor") if rope_type == "longrope" else None,
        rope_long_factor=rope.get("long_factor") if rope_type == "longrope" else None,
        partial_rotary_factor=prf if rope_type == "proportional" else None,
        llama_4_scaling_beta=rope.get("llama_4_scaling_beta"),
    )


def from_fields(cls: Any, d: dict[str, Any]) -> Any:
    """Dataclass `cls` from a dict of its fields (a "_comment" key is allowed); unknown fields are a ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"_comment"})
    if unknown:
        raise ValueError(f"config field {unknown[0]!r} is not a {cls.__name__} field")
    return cls(**{k: v for k, v in d.items() if k in names})


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude scale `0.1 * mscale * ln(scale) + 1` (1.0 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_ROPE_FIELDS = frozenset(_rope_fields({"qk_nope_head_dim": 1, "qk_rope_head_dim": 1}))
HF_FIELDS = tuple(f.name for f in dataclasses.fields(Mistral4Config) if f.name not in _ROPE_FIELDS | {"softmax_scale"})
"""The fields that HF's `Mistral4Config` shares with ours under the same name: all but the rope fields (read from
`rope_parameters` by `_rope_fields`) and the derived `softmax_scale`."""
