"""Serving: the generation loop (`generate`), samplers (`sampling`), JSONL batches (`batch`), and the
tokenizer and chat format (`chat`)."""
