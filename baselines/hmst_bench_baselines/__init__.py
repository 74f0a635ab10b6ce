"""Dense transformer baselines for hmst-bench: `dense-llama` and `dense-gpt2`, built on transformers.

Registered through the `hmst_bench` entry-point group (see `plugin.py`) exactly as a third-party
architecture would be; `models.py` holds the torch code and is imported only when a model is built.
"""
