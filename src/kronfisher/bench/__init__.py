"""Benchmarks: auto-encoder problems, training runs, comparisons, Fisher errors, result files."""
