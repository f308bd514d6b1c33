"""`VisionConfig`: the architecture of the Pixtral vision tower + Mistral 3 projector, read from an HF
`mistral3` config, Mistral's native `params.json` or our own layout."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..activations import check_activation
from ..config import from_fields

@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Architecture of the Pixtral tower + Mistral 3 projector (hashable: usable as a jit static argument).

    Read from an HF `mistral3` config (`from_hf_dict`: the `vision_config` block plus the top-level
    `spatial_merge_size`, `projector_hidden_act`, `multimodal_projector_bias`, `vision_feature_layer`,
    `image_token_index` and `text_config.hidden_size` / `rms_norm_eps`) or from Mistral's native
    `params.json` (`from_mistral_params`). `image_break_token_index` / `image_end_token_index` are not
    in HF configs (they live in the tokenizer); the defaults are tekken's `[IMG_BREAK]`=12, `[IMG_END]`=13.
    """

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 1540
    num_channels: int = 3
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int = -1
    image_token_index: int = 10
    image_break_token_index: int = 12
    image_end_token_index: int = 13
    text_hidden_size: int = 4096
    projector_norm_eps: float = 1e-6
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        """Pixtral's attention always uses hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def merged_patch_size(self) -> int:
        """Pixels per side of one image token: patch_size * spatial_merge_size (28 for the real model)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def patch_dim(self) -> int:
        """K = C * p * p: pixels per patch (the patch_conv input)."""
        return self.num_channels * self.patch_size * self.patch_size

    @property
    def feature_layers(self) -> int:
        """How many tower layers run: hidden state index `vision_feature_layer` of [embeddings, layer 1..L]."""
        f = self.vision_feature_layer
        return self.num_hidden_layers + 1 + f if f < 0 else f

    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "image_size", "num_channels", "spatial_merge_size", "text_hidden_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                             f"'num_attention_heads' ({self.num_attention_heads})")
        if self.head_dim % 4:
            raise ValueError(f"vision head dim hidden_size / num_attention_heads = {self.head_dim} must be a multiple "
                             "of 4 (2-D rope splits it into row and column halves of rotation pairs)")
        for name in ("hidden_act", "projector_hidden_act"):
            check_activation(name, getattr(self, name))
        if not isinstance(self.vision_feature_layer, int) or isinstance(self.vision_feature_layer, bool):
            raise ValueError(f"config field 'vision_feature_layer' must be an integer, got {self.vision_feature_layer!r}")
        if not 0 <= self.feature_layers <= self.num_hidden_layers:
            raise ValueError(f"config field 'vision_feature_layer' ({self.vision_feature_layer}) is out of range for "
                             f"{self.num_hidden_layers} layers (-{self.num_hidden_layers + 1}..{self.num_hidden_layers})")
        for name in ("rope_theta", "projector_norm_eps", "norm_eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"config field {name!r} must be positive, got {getattr(self, name)!r}")

    # ----------------------------------------------------------------------------------------- readers
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """From an HF `mistral3` config dict (`config.json` of `Mistral3ForConditionalGeneration`).

        ValueError naming the field for missing or inconsistent fields; a config without `vision_config`
        (a text-only checkpoint) raises too.
        """
        if d.get("model_type", "mistral3") != "mistral3":
            raise ValueError(f"config field 'model_type' must be 'mistral3' for a vision model, got {d.get('model_type')!r}")
        v = d.get("vision_config")
        if not isinstance(v, dict):
            raise ValueError("config field 'vision_config' is missing (a text-only checkpoint has no vision tower)")
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise ValueError("config field 'text_config' is missing")
        if v.get("model_type", "pixtral") != "pixtral":
            raise ValueError(f"config field 'vision_config.model_type' must be 'pixtral', got {v.get('model_type')!r}")

        def need(block: dict[str, Any], prefix: str, name: str) -> Any:
            if block.get(name) is None:
                raise ValueError(f"config field '{prefix}{name}' is missing")
            return block[name]

        kwargs: dict[str, Any] = {n: need(v, "vision_config.", n) for n in
                                  ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        for name in ("patch_size", "image_size"):
            kwargs[name] = _square(need(v, "vision_config.", name), f"vision_config.{name}")
        kwargs["num_channels"] = v.get("num_channels", 3)
        kwargs["hidden_act"] = v.get("hidden_act", "gelu")
        heads, hidden = kwargs["num_attention_heads"], kwargs["hidden_size"]
        if v.get("head_dim") is not None and isinstance(heads, int) and heads > 0 and v["head_dim"] != hidden // heads:
            raise ValueError(f"config field 'vision_config.head_dim' ({v['head_dim']}) must equal hidden_size // "
                             f"num_attention_heads ({hidden // heads}): Pixtral's attention uses the latter")
        rope = dict(v.get("rope_parameters") or v.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "axial"))
        if rope_type not in ("axial", "default"):
            raise ValueError(f"config field 'vision_config.rope_parameters.rope_type' must be 'axial', got {rope_type!r}")
        kwargs["rope_theta"] = float(rope.get("rope_theta", v.get("rope_theta", 10000.0)))

        layer = d.get("vision_feature_layer", -1)
        if isinstance(layer, (list, tuple)):
            if len(layer) != 1:
                raise ValueError(f"config field 'vision_feature_layer' ({layer!r}): several feature layers are not "
                                 "supported (Mistral 3's projector norm and patch merger take one layer's features)")
            layer = layer[0]
        kwargs.update(
            spatial_merge_size=d.get("spatial_merge_size", 2),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=bool(d.get("multimodal_projector_bias", False)),
            vision_feature_layer=layer,
            image_token_index=d.get("image_token_index", d.get("image_token_id", 10)),
            text_hidden_size=need(t, "text_config.", "hidden_size"),
            projector_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        )
        return cls(**kwargs)

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any]) -> VisionConfig:
        """From Mistral's native `params.json`: the `vision_encoder` block (or `multimodal.vision_encoder_args`)
        plus the text `dim` / `norm_eps`.

        Guessed from vLLM's / mistral-inference's `VisionEncoderArgs` and transformers' mistral3 converter:
        the tower MLP is SiLU-gated and the adapter GELU (exact); `adapter_bias` defaults to False as in
        transformers' converter; `mm_projector_id` must be "patch_merge" and `add_pre_mm_projector_layer_norm`
        true (the Mistral 3 projector); `image_size` is the largest image side (`max_image_size` if given).
        """
        v = params.get("vision_encoder")
        if v is None:
            mm = params.get("multimodal") or {}
            v = mm.get("vision_encoder_args")
            if v is not None:
                v = {**{k: x for k, x in mm.items() if k != "vision_encoder_args"}, **v}
        if not isinstance(v, dict):
            raise ValueError("params field 'vision_encoder' is missing (a text-only checkpoint has no vision tower)")

        def need(block: dict[str, Any], prefix: str, name: str) -> Any:
            if block.get(name) is None:
                raise ValueError(f"params field '{prefix}{name}' is missing")
            return block[name]

        merge = v.get("spatial_merge_size", 1)
        projector = v.get("mm_projector_id", "patch_merge" if merge > 1 else "")
        if projector != "patch_merge":
            raise ValueError(f"params field 'vision_encoder.mm_projector_id' must be 'patch_merge' (Mistral 3), got {projector!r}")
        if not v.get("add_pre_mm_projector_layer_norm", True):
            raise ValueError("params field 'vision_encoder.add_pre_mm_projector_layer_norm' must be true (Mistral 3)")
        return cls(
            hidden_size=need(v, "vision_encoder.", "hidden_size"),
            num_hidden_layers=need(v, "vision_encoder.", "num_hidden_layers"),
            num_attention_heads=need(v, "vision_encoder.", "num_attention_heads"),
            intermediate_size=need(v, "vision_encoder.", "intermediate_size"),
            patch_size=_square(need(v, "vision_encoder.", "patch_size"), "vision_encoder.patch_size"),
            image_size=_square(v.get("max_image_size") or need(v, "vision_encoder.", "image_size"), "vision_encoder.image_size"),
            num_channels=v.get("num_channels", 3),
            rope_theta=float(v.get("rope_theta", 10000.0)),
            hidden_act="silu",
            spatial_merge_size=merge,
            projector_hidden_act="gelu",
            multimodal_projector_bias=bool(v.get("adapter_bias", False)),
            vision_feature_layer=-1,
            image_token_index=v.get("image_token_id", 10),
            image_break_token_index=v.get("image_break_token_id", 12),
            image_end_token_index=v.get("image_end_token_id", 13),
            text_hidden_size=need(params, "", "dim"),
            projector_norm_eps=float(params.get("norm_eps", 1e-5)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """Our own layout (`to_dict`); an HF mistral3 dict (with `vision_config`) is also accepted."""
        if "vision_config" in d:
            return cls.from_hf_dict(d)
        return from_fields(cls, d)


def _square(x: Any, field: str) -> int:
    """An int, or a [n, n] pair (HF allows per-axis sizes; Pixtral uses square ones)."""
    if isinstance(x, (list, tuple)):
        if len(x) != 2 or x[0] != x[1]:
            raise ValueError(f"config field {field!r} must be one integer or a square pair, got {x!r}")
        x = x[0]
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"config field {field!r} must be an integer, got {x!r}")
    return x
