"""Corpora, the run tokenizer and packed token streams (see corpora.py, tokenizer.py, tokens.py)."""
