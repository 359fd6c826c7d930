"""Baselines that read no attention: keep everything, keep at random, keep the sinks and the newest (StreamingLLM)."""
import torch

from tinytis.policies.base import Policy


class Full(Policy):
    """The full cache: nothing is ever evicted."""

    evicts = False

    def score(self, ctx):
        return torch.zeros(()).expand(ctx.positions.shape)


class Random(Policy):
    """Seeded uniform scores, drawn afresh at every eviction."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, ctx):
        return torch.rand(ctx.positions.shape, generator=self.generator).to(ctx.positions.device)


class Streaming(Policy):
    """StreamingLLM: the first n_sink tokens (attention sinks), then the most recent."""

    def __init__(self, n_sink: int = 4):
        self.n_sink = n_sink

    def score(self, ctx):
        return ctx.positions.double().masked_fill(ctx.positions < self.n_sink, float("inf"))
