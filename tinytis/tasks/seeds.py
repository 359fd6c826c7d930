"""Seed ranges: training and evaluation never share a sample."""
TRAIN_SEEDS = range(0, 10**9)
EVAL_SEEDS = range(10**9, 2 * 10**9)
