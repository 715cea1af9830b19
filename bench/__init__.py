"""Benchmarks: `make bench` (or `python -m bench.run`) prints side-by-side ratios."""
