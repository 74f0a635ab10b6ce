"""Turns run results into compute-matched comparisons: statistics, scaling fits, tables and plots."""
