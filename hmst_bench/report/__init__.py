"""Comparisons of finished runs: this package turns run results (per-item eval scores, validation
losses, achieved FLOPs) into comparisons of each architecture with the dense baseline, every number
with its uncertainty: confidence intervals over items, clusters and seeds, paired differences with
their p-values (Holm-corrected across a report) and minimum detectable effects, and scaling-law fits
with the compute multiplier. Definitions are in docs/metrics.md, section "Comparisons".
"""
