"""The benchmark suite behind benchmarks/run.py (not part of the library)."""
