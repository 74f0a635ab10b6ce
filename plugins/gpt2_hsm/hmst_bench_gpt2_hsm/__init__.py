"""gpt2-hsm: GPT-2 whose output softmax is replaced by an exact hierarchical softmax over a
Huffman tree of the training corpus's token counts (`tree`, `head`, `model`; `plugin` registers it)."""
