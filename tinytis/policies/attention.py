"""Policies that score a cached token by the attention it receives: H2O, TOVA, SnapKV."""
import torch.nn.functional as F

from tinytis.policies.base import Needs, Policy

INF = float("inf")


class H2O(Policy):
    """Heavy hitters: accumulated attention mass received (summed over every query so far, mean over the GQA
    group), with the most recent half of the budget always kept."""

    needs = Needs(mass=True)

    def score(self, ctx):
        recent = ctx.positions > ctx.last_pos - (ctx.budget // 2)[:, None, None]  # (L, KV, S)
        return ctx.mass.masked_fill(recent, INF)


class TOVA(Policy):
    """Attention from the latest query, per KV head (mean over its GQA group)."""

    needs = Needs(window=1)

    def score(self, ctx):
        return ctx.window.mean(-1)


class SnapKV(Policy):
    """Attention from the last `window` queries of the prompt, max-pooled along the slots with `kernel`, mean over
    the GQA group; the window itself is always kept. (The cache sums over the window rather than averaging: same
    ranking.)"""

    def __init__(self, window: int = 32, kernel: int = 7):
        self.window, self.kernel = window, kernel
        self.needs = Needs(window=window)

    def score(self, ctx):
        L, KV, S, G = ctx.window.shape
        attn = ctx.window.permute(0, 1, 3, 2).reshape(L * KV * G, 1, S)
        pooled = F.max_pool1d(attn, self.kernel, stride=1, padding=self.kernel // 2).view(L, KV, G, S).mean(2)
        return pooled.masked_fill(ctx.positions > ctx.last_pos - self.window, INF)
