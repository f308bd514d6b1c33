"""Reading and writing weights: safetensors (`safetensors`), HF and native names (`hf`, `vision`), the Orbax
checkpoint (`checkpoint`), the loader (`load`)."""
