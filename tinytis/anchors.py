"""Anchors: the tokens every budgeted policy keeps whatever their scores (the cache manager pins them; ERT trains
with them). A fixed share of the budget, not a fixed count, so that a small budget still holds content."""
from dataclasses import dataclass

import torch

ANCHOR_SHARE = 0.25  # anchors take at most this share of a head's budget: content keeps >= 3/4 of every budget


@dataclass(frozen=True)
class Anchors:
    """Tokens a head keeps whatever their scores: the first n_sink (attention sinks), then the newest n_recent,
    together at most max_share of the head's budget, so that a small budget still holds content (at 5 % of 512
    tokens, 26 slots: 4 sinks, 2 recent, 20 content; from 80 tokens on the full 4 + 16)."""

    n_sink: int = 4
    n_recent: int = 16
    max_share: float = ANCHOR_SHARE

    def counts(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sinks, recent) kept by heads of budget k (a tensor of token counts): sinks first, then the newest."""
        cap = torch.floor(k * self.max_share).long()
        sinks = cap.clamp(max=self.n_sink)
        return sinks, (cap - sinks).clamp(max=self.n_recent)
