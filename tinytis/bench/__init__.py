"""The benchmarks behind bench.py, one module each; bench.py is the argparse over them."""
