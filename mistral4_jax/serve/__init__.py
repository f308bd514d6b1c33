"""Serving: the generation loop (`generate`), samplers (`sampling`), JSONL batches (`batch`), the
tokenizer and chat format (`chat`), image preprocessing (`image`)."""
