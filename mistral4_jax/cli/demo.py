"""`mistral4-jax demo`: the whole pipeline on an embedded default, offline, in about 50 s on a 2-core CPU.

1. Writes a small Mistral 4 checkpoint in HF format (multimodal names, bf16): the real architecture
   (MLA with q/kv LoRA, YaRN, 128-way-style routed experts at reduced count, shared expert, Pixtral
   tower + projector) at reduced size, random weights from a fixed seed, and a real Tekken tokenizer
   (mistral-common's bundled vocabulary with the Mistral 4 chat specials added).
2. Converts it with the converter, 3. loads it, 4. prints the memory plan, 5. answers three chat
   requests: reasoning off, `reasoning_effort="high"`, and one with an image.

The weights are random, so the answers are gibberish: the demo shows that every piece runs. What it
writes stays in its working directory (`./mistral4-demo` by default) for the next steps it prints.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from .. import configs
from ..config import Mistral4Config
from ..convert import convert
from ..model.vision_config import VisionConfig
from ..plan.memory import ACCELERATORS, format_plan, memory_plan
from ..weights import hf, vision
from ..weights.load import load
from .commands import positive_int

log = logging.getLogger(__name__)

DEMO_TEXT = dict(
    vocab_size=131072, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
    q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
    max_position_embeddings=1048576,
)
"""The demo's text decoder: Mistral-Small-4's config with smaller widths (same rope, router, tokens)."""

DEMO_VISION = dict(
    model_type="pixtral", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
    intermediate_size=128, patch_size=14, image_size=224, num_channels=3, rope_theta=10000.0, hidden_act="silu",
)


def say(msg: str = "") -> None:
    print(msg, flush=True)


class _Recorder:
    """Stands in for `hf.HFReader`: records the HF (name, shape) the readers ask for, returns zeros.

    Running the readers against it yields exactly the tensor list of an HF checkpoint for a config,
    so the HF names live in one place (`hf.py`, `vision.py`)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def has(self, name: str) -> bool:
        return True  # choose the fused-experts layout

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self.shapes[name] = tuple(shape)
        return np.zeros(shape, np.float32)

    def stack(self, arrays: list[Any]) -> Any:
        return np.stack(arrays)


def hf_tensor_shapes(cfg: Mistral4Config, vision_cfg: Any | None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of an HF (multimodal, on-disk names) checkpoint for these configs."""
    rec = _Recorder()
    hf.read_globals(rec, cfg)  # type: ignore[arg-type]
    for i in range(cfg.num_hidden_layers):
        hf.read_layer(rec, i, cfg)  # type: ignore[arg-type]
    shapes = {("language_model." + n if n.startswith(("model.", "lm_head.")) else n): s for n, s in rec.shapes.items()}
    if vision_cfg is not None:
        vrec = _Recorder()
        vision.read_vision_params(vrec.get, ["vision_tower.ln_pre.weight"], vision_cfg)
        shapes.update(vrec.shapes)
    return shapes


TEKKEN_SPECIALS = {
    **dict(enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                      "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                      "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"])),
    32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]",
}
"""Special-token ranks of Mistral-Small-4's tekken.json (v15) that the chat format uses: ranks 0-19 are
mistral-common's legacy specials (`Tekkenizer.DEPRECATED_SPECIAL_TOKENS`), 32-37 as in the released file
(the tekken crate's real-file test: [ARGS] 32 and [CALL_ID] 33 since v11, [THINK] 34, [/THINK] 35,
[MODEL_SETTINGS] 36, [/MODEL_SETTINGS] 37). Other ranks below 1000 are `<SPECIAL_i>` fillers here."""


def write_synthetic_tekken(out: str | os.PathLike, *, base: str = "tekken_240911.json",
                           reasoning_efforts: Sequence[str] = ("none", "high"), default_effort: str = "none",
                           image: dict[str, int] | None = None, vocab_size: int | None = None) -> Path:
    """Write a v15 ``tekken.json`` laid out like Mistral-Small-4's, offline (for the demo and the tests).

    Takes the real 131072-token Tekken vocabulary bundled with mistral-common (``base``, in
    ``mistral_common/data``; 1000 special ranks, so text ids equal the real file's), declares the special
    tokens of `TEKKEN_SPECIALS`, sets ``config.version = "v15"`` and adds ``model_settings_builder =
    {"reasoning_effort": {"values": [...], "default": "none"}}``; drops the base file's image section, and
    writes ``image`` instead when given (mistral-common's ``ImageConfig`` fields: ``{"image_patch_size": 14,
    "max_image_size": 1540, "spatial_merge_size": 2}`` for Mistral Small 3.1 / 4). mistral-common loads the
    result as an ``InstructTokenizerV15``: its chat encoding (model settings, think blocks, tools) is the
    real one.

    vocab_size: keep only the first ids (specials, bytes, the most frequent merges): a smaller vocabulary that
    tokenizes the same texts into more tokens, for tests whose cost grows with the vocabulary.
    out: a directory (writes ``out/tekken.json``) or a file path. Returns the written path.
    """
    src = importlib.resources.files("mistral_common") / "data" / base
    data = json.loads(src.read_text(encoding="utf-8"))
    top = max(TEKKEN_SPECIALS) + 1
    data["special_tokens"] = [{"rank": r, "token_str": TEKKEN_SPECIALS.get(r, f"<SPECIAL_{r}>"), "is_control": True}
                              for r in range(top)]
    data["config"]["version"] = "v15"
    if vocab_size is not None:
        specials = data["config"]["default_num_special_tokens"]
        data["vocab"] = data["vocab"][:vocab_size - specials]
        data["config"]["default_vocab_size"] = vocab_size
    data.pop("image", None)
    data.pop("multimodal", None)
    if image is not None:
        data["image"] = {k: int(image[k]) for k in ("image_patch_size", "max_image_size", "spatial_merge_size")}
    data["model_settings_builder"] = {"reasoning_effort": {"values": list(reasoning_efforts), "default": default_effort}}
    path = Path(out)
    if path.is_dir() or path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tekken.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    log.info("wrote synthetic v15 tekken file %s (from %s)", path, base)
    return path


def write_hf_checkpoint(directory: str, seed: int = 0, with_vision: bool = True) -> dict[str, Any]:
    """Write the demo checkpoint (config.json, model.safetensors in bf16, tekken.json); returns the config."""
    os.makedirs(directory, exist_ok=True)
    text = Mistral4Config().replace(**DEMO_TEXT)
    hf_config: dict[str, Any] = {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
                                 "text_config": text.to_hf_dict()}
    vision_cfg = None
    if with_vision:
        hf_config.update(vision_config=DEMO_VISION, image_token_index=10, spatial_merge_size=2,
                         projector_hidden_act="gelu", multimodal_projector_bias=False, vision_feature_layer=-1)
        vision_cfg = VisionConfig.from_hf_dict(hf_config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in sorted(hf_tensor_shapes(text, vision_cfg).items()):
        if "norm" in name.rsplit(".", 2)[-2] or name.endswith(("_layernorm.weight", "ln_pre.weight")):
            value = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        else:
            value = 0.05 * rng.standard_normal(shape, np.float32)
        tensors[name] = value.astype(ml_dtypes.bfloat16)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    write_synthetic_tekken(os.path.join(directory, "tekken.json"))
    return hf_config


def demo_image() -> Any:
    """A small synthetic picture (sky, sun, grass) so the demo needs no files."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 140), (120, 170, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 100, 200, 140], fill=(60, 150, 60))
    draw.ellipse([140, 15, 180, 55], fill=(250, 210, 60))
    return img


DEMO_TIME = "about 50 s"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
"""The demo's tool (also the quickstart notebook's): bounded arguments, so random weights finish the call."""
"""The demo's wall time on the development machine (2-core CPU), quoted by --help and the README."""

DEFAULT_WORKDIR = "mistral4-demo"
"""Where `mistral4-jax demo` keeps what it makes (relative to the current directory)."""

_MARKER = "MISTRAL4_DEMO.txt"
_MARKER_TEXT = """Written by `mistral4-jax demo` (random weights: the answers are gibberish).
hf/         a small Mistral 4 checkpoint in HF format (config.json, model.safetensors in bf16, tekken.json)
converted/  its conversion: load it with mistral4_jax.load("converted") or --checkpoint converted
Running the demo again with this directory rewrites both.
"""


def prepare_workdir(workdir: str) -> None:
    """Create `workdir`, or check that it is empty or an earlier demo's (the demo rewrites hf/ and converted/)."""
    if os.path.exists(workdir):
        if not os.path.isdir(workdir):
            raise NotADirectoryError(f"--workdir {workdir}: exists and is not a directory")
        if os.listdir(workdir) and not os.path.isfile(os.path.join(workdir, _MARKER)):
            raise FileExistsError(f"--workdir {workdir}: exists and holds files that the demo did not write; "
                                  "give an empty or new directory")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, _MARKER), "w") as f:
        f.write(_MARKER_TEXT)


def run(workdir: str = DEFAULT_WORKDIR, max_new_tokens: int = 24) -> int:
    """Run the demo; its checkpoints stay in `workdir` (hf/ and converted/) for the next steps."""
    t_all = time.perf_counter()
    prepare_workdir(workdir)
    say("mistral4-jax demo — the weights are RANDOM (no download is possible or needed): the answers are "
        "gibberish; the demo shows the pipeline working end to end.")
    say(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); working in {workdir}\n")
    src, dst = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")

    t = time.perf_counter()
    say("1/5 writing a small Mistral 4 checkpoint in HF format (bf16, multimodal names, Tekken tokenizer)")
    write_hf_checkpoint(src)
    say(f"    {src} ({_size(src)}) in {time.perf_counter() - t:.1f} s\n")

    t = time.perf_counter()
    say("2/5 converting it to an Orbax checkpoint (mistral4-jax convert)")
    convert(src, dst, dtype="bfloat16", overwrite=True, progress=True)
    say(f"    {dst} ({_size(dst)}) in {time.perf_counter() - t:.1f} s\n")

    t = time.perf_counter()
    say("3/5 loading it (mistral4_jax.load)")
    model = load(dst, dtype="bfloat16")
    vision = getattr(model, "vision_config", None) is not None
    say(f"    {model.num_params():,} parameters, weights {model.dtype.__name__}, compute "
        f"{model.compute_dtype.__name__}, vision tower: {'yes' if vision else 'no'}; {time.perf_counter() - t:.1f} s\n")

    say("4/5 memory plan (mistral4-jax plan): this model on one device, then the real model")
    say(_indent(format_plan(memory_plan(model.config, {}, model.dtype, batch=1, context=8192))))
    real = Mistral4Config.from_json(configs.resolve("mistral-small-4-119b"))
    _, hbm, mesh = ACCELERATORS["TPU v5e-16"]
    say("    Mistral-Small-4-119B, FP8 weights, on TPU v5e-16:")
    say(_indent(format_plan(memory_plan(real, mesh, jnp.float8_e4m3fn, batch=8, context=32768, hbm_per_device=hbm)), 8))
    say("")

    say("5/5 chat")
    requests = [
        ("reasoning off", [{"role": "user", "content": "What is the capital of France?"}], "none"),
        ("reasoning_effort=high", [{"role": "user", "content": "Is 97 a prime number?"}], "high"),
    ]
    if vision:
        requests.append(("with an image", [{"role": "user", "content": [
            {"type": "image", "image": demo_image()}, {"type": "text", "text": "What is in this picture?"}]}], "none"))
    else:
        say("    (this checkpoint has no vision tower loaded: the image request is skipped)")
    for label, messages, effort in requests:
        t = time.perf_counter()
        result = model.chat(messages, reasoning_effort=effort, max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t
        say(f"  [{label}] prompt {result.prompt_tokens} tokens -> {result.completion_tokens} tokens "
            f"({result.finish_reason}) in {dt:.1f} s (first call of a shape includes compilation)")
        if result.reasoning:
            say(f"    reasoning: {result.reasoning[:200]!r}")
        say(f"    content:   {result.content[:200]!r}")
    t = time.perf_counter()
    call = model.chat([{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL],
                      tool_choice="required", parallel_tool_calls=False, max_new_tokens=32)
    say(f"  [function calling, tool_choice=required] prompt {call.prompt_tokens} tokens -> {call.completion_tokens} "
        f"tokens ({call.finish_reason}) in {time.perf_counter() - t:.1f} s: constrained decoding, so even random "
        "weights write a well-formed call")
    for c in call.tool_calls:
        say(f"    call:      {c['function']['name']}({c['function']['arguments']})")
    if call.error:
        say(f"    error:     {call.error}")
    say(f"\ndone in {time.perf_counter() - t_all:.1f} s. What the demo made is kept in {workdir}/ "
        f"({_MARKER} says what is there). Next:")
    ckpt = shlex.quote(dst)
    say(f"    mistral4-jax inspect {ckpt}")
    say(f"    mistral4-jax generate --checkpoint {ckpt} --prompt 'What is the capital of France?' "
        f"--reasoning-effort none --max-new-tokens {max_new_tokens}")
    say(f"    python -c \"import mistral4_jax; m = mistral4_jax.load({dst!r}, dtype='bfloat16'); "
        f"print(m.chat([{{'role': 'user', 'content': 'Hello'}}], max_new_tokens=16).content)\"")
    return 0


def _size(path: str) -> str:
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return f"{total / 1e6:.1f} MB"


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def add_demo(sub: Any, subcommand: Any) -> None:
    about = (f"run the whole pipeline on a small random model (offline; {DEMO_TIME} on a 2-core CPU); its "
             "checkpoints stay in --workdir")
    p = subcommand(sub, "demo", help=about, description=about[0].upper() + about[1:] + ".")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help=f"where the demo writes hf/ and converted/ and keeps them (default: ./{DEFAULT_WORKDIR}); "
                        "new, empty or an earlier demo's")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="per chat answer (default 24)")
    p.set_defaults(run=lambda args: run(args.workdir, args.max_new_tokens))


if __name__ == "__main__":
    sys.exit(run())
