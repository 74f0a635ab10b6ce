"""hrm-codegen: a causal Hierarchical Reasoning Model for next-token code generation: a slow H
module and a fast L module run in nested cycles with a one-step gradient (`model`); `plugin`
registers it."""
