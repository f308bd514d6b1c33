"""`mistral4-jax export`: a converted checkpoint, an HF directory or a fine-tuning run, written back as the
safetensors + config.json + tokenizer files transformers' `Mistral4ForCausalLM` loads (`weights.export.write_hf`).

A run's LoRA adapters are folded into the weights with `merge_lora`; without it the base (with any fully trained
parameters in place) is written to DST and the adapters to DST/adapter as a PEFT LoRA adapter
(adapter_config.json + adapter_model.safetensors: lora_A [r, in], lora_B [out, r], scaling alpha / r), for the
targets that are one HF linear layer each (q_a_proj, q_b_proj, q_proj, kv_a_proj_with_mqa, o_proj, the dense and
shared-expert MLPs). Adapters on k_b_proj / v_b_proj (halves of HF's kv_b_proj) or the fused routed experts have
no such module: those need `merge_lora`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from ..model.params import layer_groups

HF_MODULE = {"q_a_proj": "self_attn.q_a_proj", "q_b_proj": "self_attn.q_b_proj", "q_proj": "self_attn.q_proj",
             "kv_a_proj": "self_attn.kv_a_proj_with_mqa", "o_proj": "self_attn.o_proj",
             "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
             "shared_expert.gate_proj": "mlp.shared_experts.gate_proj",
             "shared_expert.up_proj": "mlp.shared_experts.up_proj",
             "shared_expert.down_proj": "mlp.shared_experts.down_proj"}
"""Our weight (the end of its name) -> the HF module a PEFT adapter targets."""


def export(src: str, dst: str, merge_lora: bool = False, dtype: str = "bfloat16") -> str:
    """Write `src` (checkpoint, HF directory or run directory) to `dst` in HF format; returns dst."""
    import mistral4_jax
    from ..weights.export import write_hf
    from .run import RUN_FILE, load_run
    from .step import combine

    if not os.path.exists(os.path.join(src, RUN_FILE)):
        model = mistral4_jax.load(src, dtype="float32", layer_loop="scan", text_only=True)
        write_hf(dst, model.params, model.config, dtype=dtype, tokenizer_dir=src)
        return dst
    model, trainable, spec, _ = load_run(src)
    base_dir = json.load(open(os.path.join(src, RUN_FILE)))["checkpoint"]
    lora = {k: v for k, v in trainable.items() if isinstance(v, dict)}
    if merge_lora or not lora:
        # write_hf folds the LoraWeights in layer by layer as it writes
        write_hf(dst, combine(model.params, trainable, spec), model.config, dtype=dtype, tokenizer_dir=base_dir)
        return dst
    unmergeable = [k for k in lora if _hf_module(k) is None]
    if unmergeable:
        raise ValueError(f"{src}: the adapter on {unmergeable[0]} has no single HF module to target (PEFT); "
                         "export with --merge-lora")
    full = {k: v for k, v in trainable.items() if not isinstance(v, dict)}
    write_hf(dst, combine(model.params, full, spec), model.config, dtype=dtype, tokenizer_dir=base_dir)
    write_peft_adapter(os.path.join(dst, "adapter"), lora, model.config, spec, base=os.path.abspath(dst))
    return dst


def _hf_module(name: str) -> str | None:
    for ours, theirs in HF_MODULE.items():
        if name.endswith("." + ours):
            return theirs
    return None


def peft_tensors(lora: dict[str, Any], cfg: Any) -> dict[str, np.ndarray]:
    """PEFT names -> lora_A [r, in] / lora_B [out, r] (float32) of adapters {name: {"a" [L, *in, r], "b" [L, r, *out]}}
    on stacked layer groups."""
    offset, out = {}, {}
    start = 0
    for group, n, _ in layer_groups(cfg):
        offset[group] = start
        start += n
    for name, f in lora.items():
        group = name.split(".", 1)[0]
        module = _hf_module(name)
        a, b = np.asarray(jax.device_get(f["a"]), np.float32), np.asarray(jax.device_get(f["b"]), np.float32)
        for j in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{offset[group] + j}.{module}"
            rank = a.shape[-1]
            out[prefix + ".lora_A.weight"] = a[j].reshape(-1, rank).T.copy()
            out[prefix + ".lora_B.weight"] = b[j].reshape(rank, -1).T.copy()
    return out


def write_peft_adapter(directory: str, lora: dict[str, Any], cfg: Any, spec: Any, base: str) -> None:
    """adapter_config.json + adapter_model.safetensors of a PEFT LoRA adapter."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(peft_tensors(lora, cfg), os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({_hf_module(k) for k in lora})  # PEFT matches a module whose name ends with one
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.lora_rank, "lora_alpha": spec.lora_alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": modules, "fan_in_fan_out": False,
              "base_model_name_or_path": base, "inference_mode": True}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
