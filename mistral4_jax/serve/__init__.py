"""Serving: image preprocessing (and, with the other branches, generation, sampling, chat)."""
