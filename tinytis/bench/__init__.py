"""The benchmarks behind bench.py, one module each."""
