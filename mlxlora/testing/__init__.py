"""Tiny models and tokenizers for tests and examples; no files, no network."""
