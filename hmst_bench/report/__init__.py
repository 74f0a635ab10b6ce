"""Comparisons of finished runs: turns run results (per-item eval scores, validation losses,
achieved FLOPs) into comparisons of each architecture with the dense baseline, every number with
its uncertainty: `collect` reads runs, `stats` and `scaling` hold the statistics (definitions in
docs/metrics.md, "Comparisons"), `compare` computes the tables, `plots` and `write` make the
report folder, `cost` measures inference FLOPs per generated token.
"""
