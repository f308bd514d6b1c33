"""Long context: chunked prefill equals transformers' one-shot forward and generate (YaRN and Llama-4 query
scaling past the original context). Chunked prefill on meshes with the cache's slots split: test_sharding.py."""

from __future__ import annotations

import numpy as np
import torch

from helpers import TINY, assert_logits_close, hf_and_model

CFG = TINY.replace(original_max_position_embeddings=256)  # YaRN; the query scale changes every 256 positions
PROMPT = 4096


def test_chunked_4k_prompt_equals_transformers(tmp_path):
    """Logits of a 4,096-token prompt through chunks of 1,024 (dividing it) and 1,000 (not; the last positions
    only), and the greedy continuation after chunks of 1,000: equal transformers' (float32; the continuation
    is checked by teacher forcing, each token transformers' argmax after the prompt and the tokens before it)."""
    hf, model = hf_and_model(CFG, 5, tmp_path)
    ids = np.random.default_rng(0).integers(3, CFG.vocab_size, size=(1, PROMPT))
    model.verbose, model.prefill_chunk = False, 1000
    tokens = model.generate(ids[0].tolist(), max_new_tokens=8, stop_token_ids=[])[0].tokens
    with torch.no_grad():
        ref = hf(torch.tensor(np.concatenate([ids, [tokens[:-1]]], axis=1))).logits.numpy()
    assert ref[0, PROMPT - 1:].argmax(-1).tolist() == tokens
    model.prefill_chunk = 1024
    assert_logits_close(ref[:, :PROMPT], model.logits(ids))
    model.prefill_chunk = 1000
    assert_logits_close(ref[:, PROMPT - 5:PROMPT], model.logits(ids, last=5))
