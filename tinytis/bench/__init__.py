"""Benchmarks behind bench.py: one module per subcommand, shared helpers in common."""
