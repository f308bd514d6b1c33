"""The checkpoint being converted: its format, config, tensor index, checksum and side files.

Two source formats are read, neither with torch:
- HF: `config.json` + `model.safetensors` or shards listed in `model.safetensors.index.json`
  (text-only `Mistral4ForCausalLM` or multimodal `Mistral3ForConditionalGeneration` names).
- Mistral native: `params.json` + `consolidated.safetensors` or `consolidated-*.safetensors`
  (with or without `consolidated.safetensors.index.json`).
When a directory holds both (Mistral's HF repos do), the HF files are used.

`params.json` is mapped onto the HF config as HF's own mistral4 converter does (see
`config_from_params`); pickle weights (`*.bin`, `*.pt`, `*.pth`) are refused, never opened.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from typing import Any

from mistral4_jax.config import Mistral4Config
from mistral4_jax.weights.hf import fp8_block_size, is_vision_name
from mistral4_jax.weights.safetensors import PICKLE_SUFFIXES, SafetensorsFile, TensorIndex

log = logging.getLogger(__name__)

SIDE_FILES = (
    "tekken.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "params.json", "SYSTEM_PROMPT.txt",
)
"""Tokenizer, chat-template and generation files copied verbatim into the converted checkpoint."""

_HF_INDEX, _HF_SINGLE = "model.safetensors.index.json", "model.safetensors"
_NATIVE_INDEX, _NATIVE_SINGLE = "consolidated.safetensors.index.json", "consolidated.safetensors"


@dataclasses.dataclass
class Source:
    """An opened source checkpoint. `files` maps names in the output to files to copy."""

    path: str
    format: str
    config: Mistral4Config
    index: TensorIndex
    fp8_block: tuple[int, int]
    sha256: str
    files: dict[str, str]

    def vision_tensors(self) -> list[str]:
        return [n for n in self.index.names() if is_vision_name(n)]


def open_source(path: str | os.PathLike) -> Source:
    """Detect the format of the checkpoint directory `path` and open it (headers checked, nothing loaded)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"source checkpoint directory not found: {path}")
    has = lambda name: os.path.isfile(os.path.join(path, name))
    hf_weights = has(_HF_INDEX) or has(_HF_SINGLE)
    native_weights = has(_NATIVE_INDEX) or bool(_native_shards(path))
    if has("config.json") and (hf_weights or not (has("params.json") and native_weights)):
        return _open_hf(path)
    if has("params.json"):
        return _open_native(path)
    raise FileNotFoundError(f"{path}: no config.json (HF format) or params.json (Mistral format) found")


def _open_hf(path: str) -> Source:
    config_path = os.path.join(path, "config.json")
    raw = _read_json(config_path)
    try:
        config = Mistral4Config.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    index = TensorIndex.open(path, _HF_INDEX, _HF_SINGLE)
    files = _side_files(path)
    files["source_config.json"] = config_path
    return Source(path, "hf", config, index, fp8_block_size(raw), _checksum(path, index, _HF_INDEX), files)


def _native_shards(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(path), "consolidated*.safetensors")))


def _open_native(path: str) -> Source:
    params_path = os.path.join(path, "params.json")
    try:
        config = config_from_params(_read_json(params_path))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{params_path}: {e}") from None
    if os.path.isfile(os.path.join(path, _NATIVE_INDEX)):
        index = TensorIndex.open(path, _NATIVE_INDEX, _NATIVE_SINGLE)
    else:
        index = _open_native_shards(path)
    return Source(path, "mistral", config, index, (128, 128), _checksum(path, index, _NATIVE_INDEX), _side_files(path))


def _open_native_shards(path: str) -> TensorIndex:
    """All `consolidated*.safetensors` files of `path` as one index; a tensor stored twice is an error."""
    shards = _native_shards(path)
    if not shards:
        pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(f"{path}: only pickle weights found ({', '.join(pickles[:3])}); they are refused, never loaded")
        raise FileNotFoundError(f"{path}: params.json but no consolidated*.safetensors weights")
    files: dict[str, SafetensorsFile] = {}
    where: dict[str, str] = {}
    for full in shards:
        name = os.path.basename(full)
        files[name] = SafetensorsFile(full)
        for tensor in files[name].keys():
            if tensor in where:
                raise ValueError(f"{path}: duplicate tensor {tensor!r} in {where[tensor]} and {name}")
            where[tensor] = name
    return TensorIndex(files, where)


def config_from_params(p: dict[str, Any]) -> Mistral4Config:
    """`Mistral4Config` from a Mistral `params.json`, mapped as HF's `convert_mistral4_weight_to_hf.py`:

    dim, n_layers, hidden_dim, n_heads, n_kv_heads, norm_eps, vocab_size, tied_embeddings,
    max_position_embeddings (or max_seq_len, default 1048576), q_lora_rank, kv_lora_rank, qk_nope_head_dim,
    qk_rope_head_dim, v_head_dim; moe.{num_experts, num_experts_per_tok, first_k_dense_replace,
    num_shared_experts, expert_hidden_dim, routed_scale, num_expert_groups, num_expert_groups_per_tok}
    with norm_topk_prob true; rope_theta and yarn.{factor, original_max_position_embeddings, beta -> beta_fast,
    alpha -> beta_slow} with mscale = mscale_all_dim = 1; llama_4_scaling.beta (default 0.1).
    Not in params.json and taken as HF does: bos 1, eos 2, pad 11 (Tekken), rope_interleave true, silu.
    `yarn.apply_scale` is ignored, as HF does (the softmax scale keeps HF's mscale_all_dim correction).
    """
    moe = p.get("moe") or {}
    yarn = p.get("yarn")
    hf: dict[str, Any] = {
        "model_type": "mistral4",
        "hidden_size": p["dim"],
        "num_hidden_layers": p["n_layers"],
        "intermediate_size": p.get("hidden_dim", 0),
        "num_attention_heads": p["n_heads"],
        "num_key_value_heads": p.get("n_kv_heads"),
        "rms_norm_eps": p.get("norm_eps", 1e-6),
        "vocab_size": p["vocab_size"],
        "tie_word_embeddings": bool(p.get("tied_embeddings", False)),
        "max_position_embeddings": p.get("max_position_embeddings") or p.get("max_seq_len") or 1_048_576,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
        "n_routed_experts": moe.get("num_experts", 128),
        "num_experts_per_tok": moe.get("num_experts_per_tok", 4),
        "first_k_dense_replace": moe.get("first_k_dense_replace", 0),
        "n_shared_experts": moe.get("num_shared_experts", 1),
        "moe_intermediate_size": moe.get("expert_hidden_dim", 2048),
        "routed_scaling_factor": moe.get("routed_scale", 1.0),
        "n_group": moe.get("num_expert_groups", 1),
        "topk_group": moe.get("num_expert_groups_per_tok", 1),
        "norm_topk_prob": True,
    }
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if key in p:
            hf[key] = p[key]
    beta = (p.get("llama_4_scaling") or {}).get("beta", 0.1)
    if yarn:
        hf["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": p.get("rope_theta", 10_000.0), "factor": float(yarn["factor"]),
            "original_max_position_embeddings": int(yarn["original_max_position_embeddings"]),
            "beta_fast": float(yarn.get("beta", 32.0)), "beta_slow": float(yarn.get("alpha", 1.0)),
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": beta,
        }
        l4 = (p.get("llama_4_scaling") or {}).get("original_max_position_embeddings")
        if l4 is not None and int(l4) != int(yarn["original_max_position_embeddings"]):
            raise ValueError(f"llama_4_scaling.original_max_position_embeddings ({l4}) differs from "
                             f"yarn.original_max_position_embeddings ({yarn['original_max_position_embeddings']})")
    else:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": p.get("rope_theta", 10_000.0),
                                 "llama_4_scaling_beta": beta}
    return Mistral4Config.from_hf_dict(hf)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a JSON object")
    return d


def _side_files(path: str) -> dict[str, str]:
    return {n: os.path.join(path, n) for n in SIDE_FILES if os.path.isfile(os.path.join(path, n))}


def _checksum(path: str, index: TensorIndex, index_name: str) -> str:
    """sha256 of the index file (if any) and of every shard's name and safetensors header, in name order:
    it changes whenever a tensor's name, dtype, shape or place changes (tensor bytes are not hashed)."""
    h = hashlib.sha256()
    index_path = os.path.join(path, index_name)
    if os.path.isfile(index_path):
        with open(index_path, "rb") as f:
            h.update(f.read())
    shards = sorted({index.file_of(n).path for n in index.names()})
    for shard in shards:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(os.path.basename(shard).encode() + b"\0" + f.read(n))
    return h.hexdigest()
