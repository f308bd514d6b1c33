"""Vision end to end: a multimodal checkpoint against transformers' `Mistral3ForConditionalGeneration`.

One tiny random float32 `Mistral3ForConditionalGeneration` (text: configs/tiny.json over the first 8,192 ids of
the Tekken vocabulary, which the synthetic tekken.json keeps; vision: a small Pixtral tower) is saved once. Ours is loaded from that HF
directory and from its conversion (`convert` -> Orbax -> `load`); both must give transformers' logits (max
|Δ| ≤ 1e-3, KL ≤ 1e-5 per token) and greedy tokens for one image, two images of different sizes in one
prompt, and a batch of two left-padded prompts with different images. The prompts are built the way
users build them: mistral-common's chat ids (`Tokenizer.encode_chat_with_images`, which must equal
mistral-common's own ids) and our preprocessed pixels, which transformers receives too.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import mistral4_jax
from mistral4_jax import cli
from mistral4_jax.serve import batch
from mistral4_jax.weights import checkpoint
from mistral4_jax.convert import convert
from mistral4_jax.serve.chat import Tokenizer
from mistral4_jax.cli.demo import write_synthetic_tekken
from helpers import TINY, assert_logits_close

CFG = TINY.replace(vocab_size=8192)  # the first 8,192 ids of the real Tekken vocabulary
PATCH, MERGE, LONGEST = 4, 2, 64
IMAGE_CFG = {"image_patch_size": PATCH, "max_image_size": LONGEST, "spatial_merge_size": MERGE}
NEW_TOKENS = 4
NEVER = CFG.vocab_size - 1  # a stop id greedy decoding does not reach: every row runs NEW_TOKENS


# -------------------------------------------------------------------------------------- fixtures
def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(HF model, its save_pretrained directory with a v15 tekken.json that has an image section)."""
    text = transformers.Mistral4Config(**{**CFG.to_hf_dict(), "initializer_range": 0.1})
    vision = transformers.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=48, patch_size=PATCH, image_size=LONGEST,
                                              hidden_act="silu")
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=10,
                                         spatial_merge_size=MERGE, projector_hidden_act="gelu",
                                         multimodal_projector_bias=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.startswith(("model.vision_tower", "model.multi_modal_projector")) and p.ndim > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    directory = str(tmp_path_factory.mktemp("mistral3"))
    model.save_pretrained(directory)
    write_synthetic_tekken(directory, image=IMAGE_CFG, vocab_size=CFG.vocab_size)
    return model, directory


@pytest.fixture(scope="module")
def ours(hf):
    """Our model loaded straight from the HF directory."""
    return mistral4_jax.load(hf[1], dtype="float32")


@pytest.fixture(scope="module")
def converted_dir(hf, tmp_path_factory):
    return convert(hf[1], str(tmp_path_factory.mktemp("conv") / "ckpt"), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def converted(converted_dir):
    return mistral4_jax.load(converted_dir, dtype="float32")


@pytest.fixture(scope="module")
def images():
    # sizes after preprocessing (multiples of 8, longest edge 64): 24x32, 56x40, 16x64, 64x24
    return {"a": _image(20, 30, 1), "b": _image(50, 37, 2), "c": _image(13, 61, 3, "L"), "big": _image(300, 116, 4)}


def _conversations(images, tmp_path_factory) -> dict[str, list[dict]]:
    path = tmp_path_factory.mktemp("img") / "b.png"
    path.write_bytes(_png(images["b"]))
    uri = "data:image/png;base64," + base64.b64encode(_png(images["c"])).decode()
    return {
        "one": [{"role": "user", "content": [{"type": "image", "image": images["a"]},
                                             {"type": "text", "text": "What is in this picture?"}]}],
        "two": [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                             {"type": "image_url", "image_url": {"url": str(path)}},
                                             {"type": "text", "text": "with"},
                                             {"type": "image_url", "image_url": {"url": uri}}]}],
        "other": [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                               {"type": "image", "image": images["big"]}]}],
    }


@pytest.fixture(scope="module")
def conversations(images, tmp_path_factory):
    return _conversations(images, tmp_path_factory)


@pytest.fixture(scope="module")
def encoded(ours, conversations):
    """{case: (ids, processed images)} through the model's chat encoding (mistral-common ids)."""
    return {k: ours.encode_chat(v) for k, v in conversations.items()}


def _hf_inputs(prompts, image_lists):
    """Left-padded ids, mask, mask-following positions and HF's padded pixel batch with image_sizes."""
    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), CFG.pad_token_id, np.int64)
    mask = np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    pixels = [p.pixel_values for imgs in image_lists for p in imgs]
    hm, wm = max(x.shape[1] for x in pixels), max(x.shape[2] for x in pixels)
    pv = np.zeros((len(pixels), 3, hm, wm), np.float32)
    for i, x in enumerate(pixels):
        pv[i, :, : x.shape[1], : x.shape[2]] = x
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "pixel_values": torch.tensor(pv), "image_sizes": torch.tensor([x.shape[1:] for x in pixels])}


CASES = {"one_image": ["one"], "two_images_one_prompt": ["two"], "batch_of_two": ["one", "other"]}


@pytest.fixture(scope="module")
def references(hf, encoded):
    """{case: (inputs, logits, greedy tokens)} from transformers."""
    out = {}
    for case, keys in CASES.items():
        prompts, image_lists = [encoded[k][0] for k in keys], [encoded[k][1] for k in keys]
        inputs = _hf_inputs(prompts, image_lists)
        positions = torch.clamp(inputs["attention_mask"].cumsum(-1) - 1, min=0)
        with torch.no_grad():
            logits = hf[0](**inputs, position_ids=positions).logits.numpy()
            gen = hf[0].generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=NEVER,
                                 pad_token_id=CFG.pad_token_id)
        out[case] = (inputs, logits, gen[:, inputs["input_ids"].shape[1]:].tolist())
    return out


# ------------------------------------------------------------------------------------ encoding
def test_chat_ids_equal_mistral_common(hf, conversations, encoded, monkeypatch):
    """mistral-common's own encoder (ImageURLChunk / ImageChunk; its OpenCV resize stubbed, it does not
    change the ids) gives the same ids; each image's [IMG] count equals its features."""
    import mistral_common.tokens.tokenizers.image as mc_image
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    monkeypatch.setattr(mc_image, "transform_image", lambda image, size: np.zeros((3, size[1], size[0]), np.float32))
    reference = MistralTokenizer.from_file(os.path.join(hf[1], "tekken.json"))
    def as_url(part):  # mistral-common reads data URIs and file:// URLs
        if part["type"] == "image":
            return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(part["image"])).decode()}}
        if part["type"] == "image_url" and not part["image_url"]["url"].startswith("data:"):
            return {"type": "image_url", "image_url": {"url": "file://" + part["image_url"]["url"]}}
        return part

    for key, conv in conversations.items():
        msgs = [{**m, "content": [as_url(p) for p in m["content"]]} if isinstance(m["content"], list) else m for m in conv]
        ref = reference.encode_chat_completion(ChatCompletionRequest.from_openai(msgs))
        ids, processed = encoded[key]
        assert ids == ref.tokens, key
        assert [x.shape for x in ref.images] == [p.pixel_values.shape for p in processed]
        assert ids.count(10) == sum(p.num_features for p in processed) and 12 in ids and 13 in ids
    # the big image is downscaled: mistral-common rounds (300x116 -> 64x25 -> 8x4 tokens), transformers floors (8x3)
    big = encoded["other"][1][0]
    assert (big.rows, big.cols) == (8, 4) and big.pixel_values.shape == (3, 64, 32)


# --------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ours, encoded, references, case):
    inputs, ref_logits, _ = references[case]
    image_lists = [encoded[k][1] for k in CASES[case]]
    mask = inputs["attention_mask"].numpy()
    logits = ours.logits(inputs["input_ids"].numpy(), mask, images=[p for imgs in image_lists for p in imgs])
    assert_logits_close(ref_logits, logits, mask)
    if case == "one_image":  # the images matter: with the [IMG] token's own embedding the last logits differ
        assert np.abs(ours.logits(inputs["input_ids"].numpy())[0, -1] - ref_logits[0, -1]).max() > 1e-2


def test_converted_checkpoint_matches_transformers(ours, converted, encoded, references):
    """convert -> Orbax -> load: the same text and vision parameters, bit for bit, and transformers' logits."""
    for a, b in ((ours.params, converted.params), (ours.vision_params, converted.vision_params)):
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    inputs, ref_logits, _ = references["two_images_one_prompt"]
    logits = converted.logits(inputs["input_ids"].numpy(), images=encoded["two"][1])
    assert_logits_close(ref_logits, logits)


GREEDY = ["one", "two", "one", "other"]
"""One generation batch holding every case's prompts (a row does not depend on its batch): one compilation."""


def _expected_greedy(references) -> list[list[int]]:
    ref = {k: references[case][2][i] for case, keys in CASES.items() for i, k in enumerate(keys)}
    assert ref["one"] == references["batch_of_two"][2][0]  # transformers: the same row alone and batched
    return [ref[k] for k in GREEDY]


def test_greedy_generate_matches_transformers(ours, encoded, references):
    gens = ours.generate([encoded[k][0] for k in GREEDY], max_new_tokens=NEW_TOKENS,
                         images=[encoded[k][1] for k in GREEDY], stop_token_ids=[NEVER])
    assert [g.tokens for g in gens] == _expected_greedy(references)
    assert all(g.finish_reason == "length" for g in gens)


def test_chat_with_images_matches_transformers(ours, conversations, references):
    """model.chat on the conversations (PIL images, a file path, a data URI) = transformers' greedy tokens."""
    results = ours.chat([conversations[k] for k in GREEDY], max_new_tokens=NEW_TOKENS, stop_token_ids=[NEVER])
    assert [r.token_ids for r in results] == _expected_greedy(references)
    assert results[1].prompt_tokens == len(references["two_images_one_prompt"][0]["input_ids"][0])


# ---------------------------------------------------------------------------------- checkpoints
def test_load_and_convert_keep_vision_weights(hf, ours, converted, converted_dir, capsys):
    assert ours.vision_config == converted.vision_config and ours.vision_config.hidden_size == 32
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           ours.vision_params, converted.vision_params)
    manifest = checkpoint.read_manifest(converted_dir)
    n_vision = sum(x.size for x in jax.tree_util.tree_leaves(ours.vision_params))
    assert manifest["vision"]["parameters"] == n_vision and manifest["source"]["vision_tensors_skipped"] == 0
    assert manifest["parameters"] == sum(p.numel() for p in hf[0].parameters())
    assert cli.main(["inspect", converted_dir]) == 0
    out = capsys.readouterr().out
    assert "vision      2 layers + projector" in out and "vision/layers/attention/q_proj" in out
    bf16 = mistral4_jax.load(converted_dir, dtype="bfloat16")
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(bf16.vision_params)} == {"bfloat16"}
    assert mistral4_jax.load(converted_dir, text_only=True).vision_config is None


def test_fp8_conversion_keeps_vision_in_bf16(hf, ours, tmp_path):
    dst = convert(hf[1], str(tmp_path / "fp8"), dtype="float8_e4m3fn", progress=False)
    assert checkpoint.read_manifest(dst)["vision"]["dtype"] == "bfloat16"
    model = mistral4_jax.load(dst, dtype="float8_e4m3fn")
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(model.vision_params)} == {"bfloat16"}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                                      np.asarray(np.asarray(b).astype("bfloat16"), np.float32)),
                           model.vision_params, ours.vision_params)
    text_only = convert(hf[1], str(tmp_path / "text"), dtype="bfloat16", text_only=True, progress=False)
    assert checkpoint.read_vision_config(text_only) is None
    assert checkpoint.read_manifest(text_only)["source"]["vision_tensors_skipped"] > 0


# ------------------------------------------------------------------------------------ interfaces
def test_jsonl_batch_with_images_bad_image_fails_its_line(ours, conversations, references, tmp_path):
    """JSONL lines with image_url parts (data URIs and paths); a corrupt image fails its own line only."""
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")

    def as_uri(msgs):
        return [{**m, "content": [{"type": "image_url", "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(_png(p["image"])).decode()}}
                 if p["type"] == "image" else p for p in m["content"]]} if isinstance(m["content"], list) else m
                for m in msgs]

    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "corrupt.png")}},
                                        {"type": "text", "text": "?"}]}]
    line = lambda rid, msgs: json.dumps({"id": rid, "messages": msgs, "max_tokens": NEW_TOKENS, "stop_token_ids": [NEVER]})  # noqa: E731
    lines = [line("r0", as_uri(conversations["one"])), line("bad", bad)]
    lines += [line(f"r{i}", as_uri(conversations[k])) for i, k in enumerate(GREEDY[1:], 1)]
    out = list(batch.run(ours, lines, {}, batch_size=4))
    assert [r["id"] for r in out] == ["r0", "bad", "r1", "r2", "r3"]
    assert "corrupt.png" in out[1]["error"] and "messages[0].content[0]" in out[1]["error"]
    tok = ours.tokenizer
    for r, tokens in zip([out[0], *out[2:]], _expected_greedy(references)):
        assert r["completion_tokens"] == NEW_TOKENS and (r["reasoning"], r["content"]) == tok.split_reasoning(tokens)


def test_cli_generate_with_images(hf, converted_dir, ours, images, tmp_path, capsys):
    """`mistral4-jax generate --checkpoint DIR --prompt ... --image a.png --image b.png` streams transformers'
    greedy answer for that chat prompt and those images."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png(images["a"]))
    b.write_bytes(_png(images["b"]))
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(a)}},
                                         {"type": "image_url", "image_url": {"url": str(b)}},
                                         {"type": "text", "text": "Compare them."}]}]
    ids, processed = ours.encode_chat(msgs)
    with torch.no_grad():
        ref = hf[0].generate(**_hf_inputs([ids], [processed]), max_new_tokens=3, do_sample=False,
                             eos_token_id=CFG.eos_token_id, pad_token_id=CFG.pad_token_id)[0, len(ids):].tolist()
    ref = ref[: ref.index(CFG.eos_token_id)] if CFG.eos_token_id in ref else ref
    args = ["generate", "--checkpoint", converted_dir, "--prompt", "Compare them.", "--image", str(a), "--image", str(b),
            "--max-new-tokens", "3"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == ours.tokenizer.decode(ref, skip_special=False)
    assert cli.main(["generate", "--checkpoint", converted_dir, "--prompt", "x", "--image", str(tmp_path / "nope.png")]) == 1
    assert "nope.png" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad input
def test_images_with_a_text_only_model_raise(hf, conversations, encoded):
    text_model = mistral4_jax.load(hf[1], text_only=True)
    assert text_model.vision_config is None and text_model.tokenizer is not None
    with pytest.raises(ValueError, match="no vision tower"):
        text_model.chat(conversations["one"], max_new_tokens=1)
    ids, processed = encoded["one"]
    with pytest.raises(ValueError, match="no vision tower"):
        text_model.logits([ids], images=processed)
    with pytest.raises(ValueError, match="no vision tower"):
        text_model.generate([ids], images=[processed], max_new_tokens=1)
    text_model.logits([ids])  # ids alone are fine: [IMG] is an ordinary token there


def test_more_images_than_slots_and_bad_images_raise(ours, encoded, images, tmp_path):
    ids, processed = encoded["one"]
    with pytest.raises(ValueError, match=r"\[IMG\] tokens but the images give"):
        ours.logits([ids], images=processed * 2)
    with pytest.raises(ValueError, match=r"prompt 0: 12 \[IMG\] tokens .* 2 image\(s\) give 24"):
        ours.generate([ids], images=[processed * 2], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompt 0: 0 \[IMG\] tokens"):
        ours.generate([[1, 3, 5, 4]], images=[processed], max_new_tokens=1)
    with pytest.raises(ValueError, match="one list of images per prompt"):
        ours.generate([ids, ids], images=[processed], max_new_tokens=1)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(images["a"])[:60])
    for part, message in [({"type": "image_url", "image_url": {"url": str(truncated)}}, "truncated.png"),
                          ({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, "URLs are not fetched"),
                          ({"type": "image", "image": np.zeros((0, 4, 3), np.uint8)}, "zero-sized"),
                          ({"type": "image_url", "image_url": {}}, "needs an image_url"),
                          ({"type": "image_file", "file": "x"}, "unsupported image part")]:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
        with pytest.raises(ValueError, match=message) as err:
            ours.chat(msgs, max_new_tokens=1)
        assert "messages[0].content[1]" in str(err.value)
    with pytest.raises(ValueError, match="encode_chat_with_images"):
        ours.tokenizer.encode_chat([{"role": "user", "content": [{"type": "image", "image": images["a"]}]}])


def test_tokenizer_without_image_support(hf, ours, conversations, tmp_path):
    """A Tekken file without an image section needs the model's processor (sizes) to encode images."""
    d = tmp_path / "plain"
    write_synthetic_tekken(d, vocab_size=CFG.vocab_size)
    tok = Tokenizer.from_dir(d)
    with pytest.raises(ValueError, match="no image config"):
        tok.encode_chat_with_images(conversations["one"])
    ids, processed = tok.encode_chat_with_images(conversations["one"], image_processor=ours.image_processor)
    assert (ids, [p.token_ids for p in processed]) == (
        ours.encode_chat(conversations["one"])[0], [p.token_ids for p in ours.encode_chat(conversations["one"])[1]])
    shutil.copy(os.path.join(hf[1], "tekken.json"), tmp_path / "tekken.json")
    assert Tokenizer.from_dir(tmp_path / "tekken.json").image_processor().rounding == "round"
