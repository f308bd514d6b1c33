"""Fine-tuning: LoRA gradients follow the weight gradients (which tests/test_loss.py checks against transformers),
a LoRA run memorises a batch on 1 device and on the 8-device mesh with the same loss curve, the chat data
pipeline learns only assistant tokens and reports bad lines, `finetune` killed and resumed reproduces the
uninterrupted losses, and `export --merge-lora` gives a checkpoint whose transformers logits equal our fine-tuned
model's."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mistral4_jax
from mistral4_jax import cli
from mistral4_jax.cli import demo
from mistral4_jax.model.loss import IGNORE_INDEX, causal_lm_loss
from mistral4_jax.sharding import make_mesh
from mistral4_jax.train import run as train_run
from mistral4_jax.train.data import encode_conversation, pack, read_conversations
from mistral4_jax.train.step import TrainSpec, TrainState, combine, init_trainable, make_train_step, merged_params, optimizer
from mistral4_jax.weights.lora import LoraWeight
from helpers import TINY, make_hf_model, save_hf

CFG = TINY.replace(first_k_dense_replace=1)  # a dense layer and a MoE layer
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue, like the sky.", "reasoning_content": "Pick one."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "Four"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_hf(make_hf_model(CFG, seed=5), str(d))
    return str(d)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo checkpoint (tekken tokenizer, text only) and a JSONL of conversations with two bad lines."""
    root = tmp_path_factory.mktemp("ft")
    demo.write_hf_checkpoint(str(root / "ckpt"), with_vision=False)
    with open(root / "train.jsonl", "w") as f:
        for c in CONVERSATIONS:
            f.write(json.dumps({"messages": c}) + "\n")
        f.write("not json\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "nothing to learn"}]}) + "\n")
    return root


def test_lora_gradients_follow_the_weight_gradients(tiny):
    """d/da and d/db of the loss with adapters equal the chain rule through the merged weight's gradient; the
    loss with `LoraWeight`s equals the loss of the merged weights."""
    model = mistral4_jax.load(tiny, layer_loop="scan")
    spec = TrainSpec(lora_rank=3, lora_targets=("attn", "experts", "shared_expert"))
    trainable = init_trainable(model.params, spec, seed=1)
    key = jax.random.key(2)
    for name in trainable:  # b != 0, so both factors have gradients
        key, k = jax.random.split(key)
        trainable[name]["b"] = 0.05 * jax.random.normal(k, trainable[name]["b"].shape)
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 10))
    labels = ids.copy()
    labels[:, :3] = IGNORE_INDEX

    def loss_lora(t):
        return causal_lm_loss(combine(model.params, t, spec), CFG, ids, labels)[0]

    def loss_merged(p):
        return causal_lm_loss(p, CFG, ids, labels)[0]

    merged = merged_params(model.params, trainable, spec)
    value, g_lora = jax.value_and_grad(loss_lora)(trainable)
    value_m, g_w = jax.value_and_grad(loss_merged)(merged)
    assert float(value) == pytest.approx(float(value_m), rel=1e-6)
    flat_gw = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(g_w)}
    scale = spec.lora_alpha / spec.lora_rank
    for name, f in trainable.items():
        w = flat_gw["".join(f"['{p}']" for p in name.split("."))]
        rank = f["a"].shape[-1]
        batch = f["a"].ndim + f["b"].ndim - w.ndim - 2
        g = np.asarray(w).reshape(*w.shape[:batch], int(np.prod(f["a"].shape[batch:-1])), -1)  # [*batch, in, out]
        a = np.asarray(f["a"]).reshape(*f["a"].shape[:batch], -1, rank)
        b = np.asarray(f["b"]).reshape(*f["b"].shape[:batch], rank, -1)
        want_a = scale * g @ np.swapaxes(b, -1, -2)
        want_b = scale * np.swapaxes(a, -1, -2) @ g
        for got, want in ((g_lora[name]["a"], want_a), (g_lora[name]["b"], want_b)):  # float32 sums of products
            np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="LoRA target 'nope' matches no weight"):
        init_trainable(model.params, TrainSpec(lora_targets=("nope",)))


def test_lora_memorises_on_one_and_eight_devices(tiny):
    """A rank-8 LoRA on attention, experts and shared expert memorises 4 rows (loss falls >= 90% in 60 steps) with
    gradient accumulation (2 micro-batches), on one device and on data=2 x expert=2 x tensor=2, with the same curve."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, (2, 2, 16)).astype(np.int32)
    labels = ids.copy()
    labels[..., :4] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}
    spec = TrainSpec(lora_rank=8, lora_targets=("attn", "experts", "shared_expert"), train_params=("final_norm",), lr=2e-2,
                     warmup_steps=2, steps=60)
    curves = []
    for mesh in (None, make_mesh("data=2,expert=2,tensor=2")):
        model = mistral4_jax.load(tiny, mesh=mesh, layer_loop="scan")
        trainable = init_trainable(model.params, spec)
        opt = optimizer(spec)
        state = TrainState(jnp.int32(0), trainable, opt.init(trainable))
        step = make_train_step(CFG, model.params, spec, opt, mesh)
        losses = []
        for _ in range(spec.steps):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        curves.append(np.asarray(losses))
    one, eight = curves
    assert one[-1] <= 0.1 * one[0] and eight[-1] <= 0.1 * eight[0], (one, eight)
    # the same curve while float reassociation across the mesh has not yet been amplified (at this learning rate
    # the two runs drift apart later, each still memorising)
    np.testing.assert_allclose(eight[:20], one[:20], rtol=1e-3)


def test_chat_data_learns_assistant_turns_and_reports_bad_lines(demo_dir):
    model = mistral4_jax.load(demo_dir / "ckpt", text_only=True)
    tok = model.tokenizer
    ex = encode_conversation(tok, CONVERSATIONS[3])
    learned = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(learned) == "Hello! How can I help?Goodbye."  # both assistant turns (+ </s>), nothing else
    assert learned.count(tok.eos_id) == 2 and len(ex.ids) == len(ex.labels)
    reasoning = encode_conversation(tok, CONVERSATIONS[1])
    assert tok.decode([t for t in reasoning.labels if t != IGNORE_INDEX]) == "Pick one.Blue, like the sky."
    examples, report = read_conversations(str(demo_dir / "train.jsonl"), tok, seq_len=64)
    assert len(examples) == 4 and [e["line"] for e in report["errors"]] == [5, 6]
    assert "must end with an assistant message" in report["errors"][1]["error"]
    short, report = read_conversations(str(demo_dir / "train.jsonl"), tok, seq_len=12, long="drop")
    assert report["dropped"] == 4 and not short
    rows = pack(examples, 64)
    assert rows["input_ids"].shape[0] < 4 and rows["attention_mask"].sum() == sum(len(e.ids) for e in examples)


def _finetune_args(demo_dir, out, *extra):
    return ["finetune", "--checkpoint", str(demo_dir / "ckpt"), "--data", str(demo_dir / "train.jsonl"), "--out", str(out),
            "--lora-rank", "4", "--lora-targets", "q_a_proj,q_b_proj,kv_a_proj,o_proj,shared_expert", "--train-params", "final_norm", "--steps", "6",
            "--lr", "1e-2", "--warmup", "1", "--batch", "2", "--seq-len", "64", "--save-every", "3", *extra]


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory):
    """A CLI finetune run of 6 steps (checkpoints at 3 and 6) and its metrics."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(_finetune_args(demo_dir, out)) == 0
    metrics = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, 7)) and metrics[-1]["loss"] < metrics[0]["loss"]
    return out, metrics


def test_killed_finetune_resumes_with_the_same_losses(demo_dir, trained_run, tmp_path, monkeypatch):
    """A run that dies after step 4 (checkpoint at 3) and `--resume`s logs the uninterrupted run's losses; a
    resume with other settings is refused."""
    _, want = trained_run
    real_batch_at = train_run.batch_at

    def dies_at_step_5(rows, step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return real_batch_at(rows, step, *args, **kwargs)

    monkeypatch.setattr(train_run, "batch_at", dies_at_step_5)
    assert cli.main(_finetune_args(demo_dir, tmp_path / "killed")) == 130  # Ctrl-C (or a crash) at step 5
    monkeypatch.setattr(train_run, "batch_at", real_batch_at)
    assert cli.main(_finetune_args(demo_dir, tmp_path / "killed", "--resume")) == 0
    got = [json.loads(x) for x in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [(m["step"], m["loss"]) for m in got] == [(m["step"], m["loss"]) for m in want]
    assert cli.main(_finetune_args(demo_dir, tmp_path / "killed", "--resume", "--lr", "2e-2")) == 1  # another config


def test_export_equals_transformers(trained_run, tmp_path):
    """`export --merge-lora` writes what transformers' Mistral4ForCausalLM loads, with our fine-tuned logits; without
    --merge-lora the base and a PEFT adapter whose W + alpha / r * B @ A is the merged weight."""
    run, _ = trained_run
    assert cli.main(["export", str(run), str(tmp_path / "hf"), "--merge-lora", "--dtype", "float32"]) == 0
    model, trainable, spec, step = train_run.load_run(str(run))
    assert step == 6
    ours = mistral4_jax.Mistral4(model.config, merged_params(model.params, trainable, spec))
    ids = np.random.default_rng(1).integers(3, 1000, (2, 12))
    from transformers import Mistral4ForCausalLM

    ref = Mistral4ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours.logits(ids) - theirs).max() <= 1e-3
    base = mistral4_jax.Mistral4(model.config, model.params).logits(ids)
    assert np.abs(base - theirs).max() > 1e-2  # the fine-tuning changed the model

    # without --merge-lora: the base (final_norm trained in full) and a PEFT adapter whose W + scale * B @ A is the merge
    assert cli.main(["export", str(run), str(tmp_path / "peft"), "--dtype", "float32"]) == 0
    from safetensors.numpy import load_file

    adapter = load_file(str(tmp_path / "peft" / "adapter" / "adapter_model.safetensors"))
    config = json.load(open(tmp_path / "peft" / "adapter" / "adapter_config.json"))
    merged, plain = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "peft" / "model.safetensors"))
    name = "model.layers.1.self_attn.q_a_proj.weight"
    a, b = (adapter[f"base_model.model.{name[:-len('.weight')]}.lora_{x}.weight"] for x in "AB")
    np.testing.assert_allclose(plain[name] + config["lora_alpha"] / config["r"] * b @ a, merged[name], atol=1e-6)
    np.testing.assert_array_equal(plain["model.norm.weight"], merged["model.norm.weight"])
