"""Benchmarks of onecard, each runnable as ``python -m benchmarks.<name>``; see benchmarks/README.md."""
