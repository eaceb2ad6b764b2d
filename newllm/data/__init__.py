"""Data: tokenizers, corpora, windows, task generators."""
