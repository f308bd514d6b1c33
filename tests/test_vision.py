"""Vision: Pixtral tower, Mistral 3 projector and image preprocessing against transformers (float32).

One tiny random `Mistral3ForConditionalGeneration` (Mistral 4 tiny text config + a small Pixtral config)
is built and saved once per module; the tower, projector and `get_image_features` are compared with ours
read from the saved checkpoint. Preprocessing is compared with transformers' `PixtralImageProcessorPil`
(the processor `mistral3` uses without torchvision) and the token layout with `PixtralProcessor`'s code.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import io
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.pixtral import image_processing_pil_pixtral

from mistral4_jax.model import vision as V, vision_packing as VP
from mistral4_jax.serve import image as I
from mistral4_jax.weights import vision as WV
from mistral4_jax.weights.hf import HFReader, is_vision_name
from mistral4_jax.weights.safetensors import TensorIndex
from helpers import TINY

ATOL = 1e-4
PATCH, MERGE, LONGEST = 4, 2, 64


# -------------------------------------------------------------------------------------- fixtures
def _hf_config(**top) -> transformers.Mistral3Config:
    text = transformers.Mistral4Config(**TINY.to_hf_dict())
    vision = transformers.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=48, patch_size=PATCH, image_size=LONGEST,
                                              hidden_act="silu")
    kwargs = dict(vision_config=vision, text_config=text, image_token_index=10, multimodal_projector_bias=True,
                  projector_hidden_act="gelu", spatial_merge_size=MERGE)
    kwargs.update(top)
    return transformers.Mistral3Config(**kwargs)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(model, saved directory): random weights of order-one effect (norms perturbed, biases non-zero)."""
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.vision_tower", "model.multi_modal_projector")):
                continue
            if p.ndim == 1:
                p.copy_((1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    directory = str(tmp_path_factory.mktemp("mistral3"))
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def vcfg(hf):
    with open(os.path.join(hf[1], "config.json")) as f:
        return V.VisionConfig.from_hf_dict(json.load(f))


@pytest.fixture(scope="module")
def params(hf, vcfg):
    index = TensorIndex.open(hf[1])
    return WV.read_vision_params(HFReader(index, hf[1], vision=True).get, index.names(), vcfg)


@pytest.fixture(scope="module")
def proc(vcfg):
    return I.ImageProcessor.from_vision_config(vcfg)


def _hf_proc():
    return image_processing_pil_pixtral.PixtralImageProcessorPil(
        patch_size={"height": PATCH * MERGE, "width": PATCH * MERGE}, size={"longest_edge": LONGEST})


def _random_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a, "RGBA").convert(mode)


def _batch(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's padded batch [I, C, Hmax, Wmax] and image_sizes [I, 2]."""
    hm, wm = max(x.shape[1] for x in images), max(x.shape[2] for x in images)
    out = np.zeros((len(images), 3, hm, wm), np.float32)
    for i, x in enumerate(images):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return torch.tensor(out), torch.tensor([x.shape[1:] for x in images])


def _pixels(*sizes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in sizes]


# ------------------------------------------------------------------------------------------ config
def test_config_from_saved_hf_config(vcfg):
    assert (vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.num_attention_heads, vcfg.head_dim) == (32, 2, 2, 16)
    assert (vcfg.patch_size, vcfg.spatial_merge_size, vcfg.image_size, vcfg.merged_patch_size) == (4, 2, 64, 8)
    assert (vcfg.hidden_act, vcfg.projector_hidden_act, vcfg.multimodal_projector_bias) == ("silu", "gelu", True)
    assert (vcfg.text_hidden_size, vcfg.projector_norm_eps, vcfg.image_token_index) == (TINY.hidden_size, TINY.rms_norm_eps, 10)
    assert vcfg.feature_layers == 2 and vcfg.rope_theta == 10000.0
    assert V.VisionConfig.from_dict(vcfg.to_dict()) == vcfg


def _cfg_dict() -> dict:
    return _hf_config().to_dict()


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("vision_config"), "vision_config"),
    (lambda d: d["vision_config"].pop("hidden_size"), "vision_config.hidden_size"),
    (lambda d: d["text_config"].pop("hidden_size"), "text_config.hidden_size"),
    (lambda d: d["vision_config"].update(head_dim=8), "vision_config.head_dim"),
    (lambda d: d["vision_config"].update(patch_size=[4, 8]), "vision_config.patch_size"),
    (lambda d: d["vision_config"].update(hidden_act="prelu"), "hidden_act"),
    (lambda d: d.update(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
    (lambda d: d.update(vision_feature_layer=-4), "vision_feature_layer"),
    (lambda d: d.update(model_type="llava"), "model_type"),
    (lambda d: d["vision_config"].update(num_attention_heads=3), "hidden_size"),
])
def test_config_errors_name_the_field(edit, field):
    d = _cfg_dict()
    edit(d)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        V.VisionConfig.from_hf_dict(d)


def test_config_from_mistral_params():
    params = {"dim": 64, "norm_eps": 1e-5, "vision_encoder": {
        "hidden_size": 32, "num_channels": 3, "image_size": 64, "max_image_size": 64, "patch_size": 4,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "rope_theta": 10000.0,
        "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
        "spatial_merge_size": 2, "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}}
    c = V.VisionConfig.from_mistral_params(params)
    assert (c.hidden_size, c.text_hidden_size, c.merged_patch_size, c.multimodal_projector_bias) == (32, 64, 8, False)
    nested = {"dim": 64, "multimodal": {"vision_encoder_args": params["vision_encoder"]}}
    assert V.VisionConfig.from_mistral_params(nested).hidden_size == 32
    with pytest.raises(ValueError, match="vision_encoder"):
        V.VisionConfig.from_mistral_params({"dim": 64})


# ------------------------------------------------------------------------------------------ params
def test_param_tree_matches_init_and_axes(vcfg, params):
    abstract = V.abstract_params(vcfg)
    axes = V.param_axes(vcfg)
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert jax.tree_util.tree_map(lambda x: x.shape, abstract) == shapes
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert [len(a) for a in flat_axes] == [len(s) for s in flat_shapes]
    assert all(name in V.VISION_RULES for a in flat_axes for name in a)
    assert axes["layers"]["attention"]["q_proj"] == ("vision_layers", "vision_embed", "vision_heads", "vision_head_dim")


def _native_state(hf_model, vcfg) -> dict[str, np.ndarray]:
    """The model's vision weights under Mistral's native names (inverse of transformers' converter)."""
    n, hd, d = vcfg.num_attention_heads, vcfg.head_dim, vcfg.hidden_size
    table = [("model.vision_tower.transformer.", "vision_encoder.transformer."),
             ("model.vision_tower.", "vision_encoder."),
             ("model.multi_modal_projector.patch_merger.", "patch_merger."),
             ("model.multi_modal_projector.norm.", "pre_mm_projector_norm."),
             ("model.multi_modal_projector.linear_1.", "vision_language_adapter.w_in."),
             ("model.multi_modal_projector.linear_2.", "vision_language_adapter.w_out.")]
    leaf = {"attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk", "attention.v_proj": "attention.wv",
            "attention.o_proj": "attention.wo", "feed_forward.gate_proj": "feed_forward.w1",
            "feed_forward.down_proj": "feed_forward.w2", "feed_forward.up_proj": "feed_forward.w3"}
    out = {}
    for name, t in hf_model.state_dict().items():
        for src, dst in table:
            if name.startswith(src):
                new = dst + name[len(src):]
                for a, b in leaf.items():
                    new = new.replace(a, b)
                w = t.numpy()
                if new.endswith(("wq.weight", "wk.weight")):  # rotate-half rows -> interleaved pairs
                    w = w.reshape(n, 2, hd // 2, d).transpose(0, 2, 1, 3).reshape(n * hd, d)
                out[new] = w
                break
    return out


def _dict_getter(state: dict[str, np.ndarray]):
    def get(name, shape):
        if name not in state:
            raise ValueError(f"missing tensor {name!r}")
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {state[name].shape}, expected {shape}")
        return state[name]
    return get


def test_native_and_in_memory_names_read_the_same_params(hf, vcfg, params):
    native = _native_state(hf[0], vcfg)
    assert "vision_language_adapter.w_in.weight" in native and "vision_encoder.ln_pre.weight" in native
    ours = WV.read_vision_params(_dict_getter(native), native, vcfg)
    memory = {k: v.numpy() for k, v in hf[0].state_dict().items()}
    ours_mem = WV.read_vision_params(_dict_getter(memory), memory, vcfg)
    for tree in (ours, ours_mem):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), tree, params)


@pytest.mark.parametrize("case, message", [
    ("missing", "missing tensor 'vision_tower.transformer.layers.1.ffn_norm.weight'"),
    ("shape", "multi_modal_projector.linear_1.weight"),
    ("extra_layer", "unexpected vision tensor 'vision_tower.transformer.layers.2.ffn_norm.weight'.*2 layers"),
    ("text_only", "text-only"),
])
def test_read_errors_name_the_tensor(hf, vcfg, case, message):
    index = TensorIndex.open(hf[1])
    state = {n: np.asarray(index.get(n), np.float32) for n in index.names() if is_vision_name(n)}
    if case == "missing":
        del state["vision_tower.transformer.layers.1.ffn_norm.weight"]
    elif case == "shape":
        state["multi_modal_projector.linear_1.weight"] = state["multi_modal_projector.linear_1.weight"][:, :-1]
    elif case == "extra_layer":
        state["vision_tower.transformer.layers.2.ffn_norm.weight"] = state["vision_tower.transformer.layers.1.ffn_norm.weight"]
    else:
        state = {"model.embed_tokens.weight": np.zeros((2, 2))}
    with pytest.raises(ValueError, match=message):
        WV.read_vision_params(_dict_getter(state), state, vcfg)


# --------------------------------------------------------------------------------- tower/projector
@pytest.mark.parametrize("sizes, block", [(((24, 32),), 512), (((24, 32), (16, 40), (8, 8)), 512),
                                          (((24, 32), (16, 40), (8, 8)), 16)],
                         ids=["one_image", "three_images", "three_images_blocked"])
def test_tower_matches_hf(hf, vcfg, params, sizes, block):
    images = _pixels(*sizes)
    pv, image_sizes = _batch(images)
    with torch.no_grad():
        ref = hf[0].model.vision_tower(pv, image_sizes=image_sizes).last_hidden_state[0].numpy()
    packed = VP.pack_images(images, vcfg, bucket=16)
    assert packed.num_patches == ref.shape[0] and packed.patches.shape[0] % 16 == 0
    ours = V.encode(params, vcfg, packed.patches, packed.positions, packed.segments, attn_block=block)
    np.testing.assert_allclose(np.asarray(ours)[: packed.num_patches], ref, atol=ATOL)
    assert np.abs(ref).max() > 0.5


def test_projector_matches_hf(hf, vcfg, params):
    images = _pixels((24, 32), (16, 40), (12, 12))  # the last one: 3x3 patches, one 2x2 window
    _, image_sizes = _batch(images)
    packed = VP.pack_images(images, vcfg)
    feats = np.random.default_rng(1).standard_normal((packed.num_patches, vcfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf[0].model.multi_modal_projector(torch.tensor(feats), image_sizes).numpy()
    padded = np.zeros((packed.patches.shape[0], vcfg.hidden_size), np.float32)
    padded[: packed.num_patches] = feats
    ours = V.project(params, vcfg, padded, packed.merge_index)[: packed.num_tokens]
    assert packed.tokens_per_image == [12, 10, 1] and ref.shape == ours.shape
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL)
    assert np.abs(ref).max() > 0.5


def test_image_features_match_get_image_features(hf, vcfg, params, proc):
    """Our preprocessing + features for two images of different sizes in one call == HF's processor +
    `Mistral3Model.get_image_features`; the counts fit the [IMG] tokens of the layout."""
    pil = [_random_image(50, 30, seed=1), _random_image(20, 61, "RGBA", seed=2)]
    ref_in = _hf_proc()(pil, return_tensors="pt")
    with torch.no_grad():
        ref = torch.cat(hf[0].model.get_image_features(ref_in["pixel_values"], image_sizes=ref_in["image_sizes"]).pooler_output)
    processed = proc(pil)
    ours = V.image_features(params, vcfg, [p.pixel_values for p in processed])
    assert ours.shape == (ref.shape[0], vcfg.text_hidden_size)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=ATOL)
    assert sum(p.token_ids.count(vcfg.image_token_index) for p in processed) == ours.shape[0]
    # HF's padded-batch input with image_sizes gives the same features
    padded = V.image_features(params, vcfg, ref_in["pixel_values"].numpy(), ref_in["image_sizes"].tolist())
    np.testing.assert_allclose(np.asarray(padded), np.asarray(ours), atol=1e-6)


def test_vision_feature_layer(hf, vcfg, params):
    images = _pixels((16, 24))
    pv, image_sizes = _batch(images)
    with torch.no_grad():
        ref = torch.cat(hf[0].model.get_image_features(pv, image_sizes=image_sizes, vision_feature_layer=-2).pooler_output)
    ours = V.image_features(params, dataclasses.replace(vcfg, vision_feature_layer=-2), images)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=ATOL)


def test_bfloat16_storage_and_compute_close_to_float32(vcfg, params):
    images = _pixels((24, 32), (16, 40))
    ref = np.asarray(V.image_features(params, vcfg, images))
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    ours = V.image_features(bf16, vcfg, images, dtype=jnp.bfloat16, attn_block=16)
    assert ours.dtype == jnp.bfloat16
    assert np.abs(np.asarray(ours, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_real_config_shapes():
    """The released model's (partly unverified) vision config: shapes only (eval_shape), ~0.43 B parameters."""
    real = V.VisionConfig()
    abstract = V.abstract_params(real)
    assert abstract["layers"]["attention"]["q_proj"].shape == (24, 1024, 16, 64)
    assert abstract["patch_embed"]["patch_conv"].shape == (3 * 14 * 14, 1024)
    assert abstract["projector"]["merging_layer"].shape == (4, 1024, 1024)
    assert abstract["projector"]["linear_2"].shape == (4096, 4096)
    assert 0.42e9 < V.count_params(real) < 0.44e9
    assert VP.num_image_tokens(1540, 1036, real) == (55, 37)


def test_scatter_image_features():
    ids = jnp.array([[1, 10, 10, 12, 10, 13, 5], [10, 13, 7, 7, 7, 7, 7]])
    embeds = jnp.zeros((2, 7, 3))
    feats = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + 1
    out = np.asarray(V.scatter_image_features(embeds, ids, feats, 10))
    np.testing.assert_array_equal(out[0, [1, 2, 4]], np.asarray(feats[:3]))
    np.testing.assert_array_equal(out[1, 0], np.asarray(feats[3]))
    assert out[0, [0, 3, 5, 6]].sum() == 0 and out[1, 1:].sum() == 0
    V.check_image_token_count(ids, 4, 10)
    with pytest.raises(ValueError, match="4 \\[IMG\\] tokens but the images give 5"):
        V.check_image_token_count(ids, 5, 10)


# ---------------------------------------------------------------------------------- preprocessing
def _hf_layout(height: int, width: int) -> list[int]:
    """transformers' own `PixtralProcessor.replace_image_token` (the module needs torchvision to import,
    so the method's source is compiled on its own), mapped to ids [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13."""
    path = os.path.join(os.path.dirname(transformers.__file__), "models", "pixtral", "processing_pixtral.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PixtralProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "replace_image_token")
    namespace: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
    me = types.SimpleNamespace(patch_size=PATCH, spatial_merge_size=MERGE, image_token="[IMG]",
                               image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
    text = namespace["replace_image_token"](me, {"image_sizes": [(height, width)]}, 0)
    ids = {"[IMG]": 10, "[IMG_BREAK]": 12, "[IMG_END]": 13}
    out, rest = [], text
    while rest:
        tok = next(t for t in ("[IMG_BREAK]", "[IMG_END]", "[IMG]") if rest.startswith(t))
        out.append(ids[tok])
        rest = rest[len(tok):]
    return out


CASES = [(30, 50, "RGB"), (5, 3, "RGB"), (8, 8, "L"), (200, 90, "RGB"), (64, 64, "RGBA"), (7, 300, "L"),
         (77, 13, "P"), (100, 100, "LA"), (33, 65, "RGBA")]


@pytest.mark.parametrize("h, w, mode", CASES, ids=[f"{h}x{w}_{m}" for h, w, m in CASES])
def test_preprocess_matches_hf(proc, h, w, mode):
    img = _random_image(h, w, mode, seed=h * w)
    ref = _hf_proc()(img, return_tensors="np")
    ours = proc.preprocess(img)
    (rh, rw), = ref["image_sizes"]
    assert ours.pixel_values.shape == (3, rh, rw) and ours.pixel_values.dtype == np.float32
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"][0], atol=1e-5)
    assert ours.token_ids == _hf_layout(int(rh), int(rw)) == proc.token_ids(h, w)
    assert ours.num_features == ours.token_ids.count(10) == (rh // 8) * (rw // 8)


def test_transparency_composited_on_white(proc):
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    for src in (Image.fromarray(rgba, "RGBA"), rgba):
        np.testing.assert_allclose(proc.preprocess(src).pixel_values, proc.preprocess(np.full((16, 16, 3), 255, np.uint8)).pixel_values)
    np.testing.assert_allclose(proc.preprocess(rgba).pixel_values, _hf_proc()(rgba, return_tensors="np")["pixel_values"][0], atol=1e-5)
    p = Image.new("P", (9, 9))
    p.info["transparency"] = 0
    np.testing.assert_allclose(proc.preprocess(p).pixel_values, _hf_proc()(p, return_tensors="np")["pixel_values"][0], atol=1e-5)


def test_sources_give_the_same_pixels(proc, tmp_path):
    img = _random_image(37, 45, seed=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    path = tmp_path / "img.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    ref = proc.preprocess(img).pixel_values
    for src in (str(path), path, f"file://{path}", data, bytearray(data), uri, np.asarray(img)):
        np.testing.assert_array_equal(proc.preprocess(src).pixel_values, ref)


def test_bad_images_raise_value_error_naming_them(proc, tmp_path):
    good = io.BytesIO()
    _random_image(40, 40, seed=4).save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
    cases = [
        (str(truncated), "truncated.png"), (str(corrupt), "corrupt.jpg"), (str(deep), "deep.png.*mode"),
        (str(tmp_path / "missing.png"), "missing.png.*no such file"), (b"garbage", "<7 bytes>"),
        ("data:image/png;base64,@@@", "data:image/png.*base64"), ("data:image/png,abc", "data URI"),
        (np.zeros((0, 5, 3), np.uint8), "zero-sized"), (Image.new("RGB", (0, 4)), "zero-sized"),
        (np.zeros((4, 4, 3), np.float32), "uint8"), (np.zeros((4, 4, 2), np.uint8), "shape"),
        (Image.new("F", (4, 4)), "mode 'F'"), ("https://example.com/a.png", "URLs are not fetched"), (3.5, "unsupported image type"),
    ]
    for src, message in cases:
        with pytest.raises(ValueError, match=message):
            proc.preprocess(src)
    with pytest.raises(ValueError, match=r"image 1 \(.*corrupt\.jpg\)"):
        proc([_random_image(8, 8), str(corrupt)])


def test_resize_rounding_and_mistral_common_token_counts():
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

    encoder = ImageEncoder(ImageConfig(PATCH, LONGEST, MERGE), SpecialImageIDs(10, 12, 13))
    floor = I.ImageProcessor(PATCH, MERGE, LONGEST)
    rnd = dataclasses.replace(floor, rounding="round")
    for h, w in [(116, 300), (5, 3), (64, 64), (300, 116), (1000, 3), (65, 64)]:
        cols, rows = encoder._image_to_num_tokens(Image.new("RGB", (w, h)))
        assert rnd.token_grid(h, w) == (rows, cols)
    assert floor.token_grid(116, 300) == (3, 8) and rnd.token_grid(116, 300) == (4, 8)
    assert I.resize_target(1, 5000, 64, 8) == (8, 64)  # floored to 0 rows by transformers; we keep one
    assert I.image_token_ids(2, 3) == [10, 10, 10, 12, 10, 10, 10, 13]
