"""Reading and writing weights: safetensors, HF and native names, the vision weights, the loader."""
