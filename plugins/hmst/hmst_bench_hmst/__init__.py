"""hmst: the Hierarchical Memory-State Transformer plugin. Built so far: the selective state-space
scan of the episodic memory (`ssm`), the FAISS semantic store (`semantic`) and the MoE language
model (`moe`, `model`); `plugin` registers what is built (see the README for what is not)."""
