"""Policies that score a cached token by the attention it receives: H2O, TOVA, SnapKV."""
import torch
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
    """TOVA (Oren et al. 2024): attention from the latest query, averaged over all the layer's query heads, so every
    KV head of a layer scores a token alike and keeps the same tokens (as the paper and kvpress's TOVAPress). A head
    that no longer holds a token gave it no attention."""

    needs = Needs(window=1)

    def score(self, ctx):
        L, KV, S, G = ctx.window.shape
        received = ctx.window.sum(-1).masked_fill(~ctx.valid, 0).view(L, KV * S)  # from the G query heads of each KV head
        token = torch.searchsorted(ctx.token_pos, ctx.positions.clamp(min=0)).view(L, KV * S)  # the held token in each slot
        token = token.clamp(max=len(ctx.token_pos) - 1)
        per_token = received.new_zeros(L, len(ctx.token_pos)).scatter_add_(1, token, received) / (KV * G)  # (L, N)
        return per_token.gather(1, token).view(L, KV, S)


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
