"""The eviction policy interface: what a policy may read (ScoreContext) and what it declares it needs (Needs).

A policy scores the cached slots of one sequence, higher = keep. The CacheManager, not the policy, decides
how many slots each (layer, KV head) keeps, enforces the anchors and frees pages.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from tinytis.anchors import Anchors


@dataclass(frozen=True)
class Needs:
    """What the engine must record for a policy; everything not asked for is never computed."""

    mass: bool = False  # attention mass each slot has received from every query so far
    window: int = 0  # attention from the last `window` queries of the latest forward
    keys: bool = False  # the cached keys themselves
    hidden: bool = False  # final-layer hidden states of the cached tokens
    reference: bool = False  # a reference answer, prefilled after the context; window = the answer's queries
    dms_window: int | None = None  # DMS decisions of the model (tinytis.dms), applied beyond this distance
    # a number stored with each slot when its token is written: slot_value(layer, x) -> (B, KV, T), x: (B, T, dim)
    # the layer's normed attention input (TRIM-KV: log beta, the token's retention)
    slot_value: Callable | None = None


@dataclass
class ScoreContext:
    """One sequence's cache, as a policy sees it. Slots are per (layer, KV head), in position order; a head's
    slots past its length are padding, with position -1. L layers, KV heads, S slots, G query heads per KV head."""

    positions: torch.Tensor  # (L, KV, S) original position of each slot, -1 for padding
    budget: torch.Tensor  # (L,) tokens each KV head of a layer keeps after this eviction
    last_pos: int  # position of the newest token of the sequence
    token_pos: torch.Tensor  # (N,) positions of the tokens held by at least one head, increasing
    token_ids: torch.Tensor  # (N,) their token ids
    hidden: torch.Tensor | None = None  # (N, dim) their final-layer hidden states (Needs.hidden)
    mass: torch.Tensor | None = None  # (L, KV, S) attention received so far, mean over the GQA group (Needs.mass)
    window: torch.Tensor | None = None  # (L, KV, S, G) attention from the window queries, summed over them (Needs.window)
    keys: torch.Tensor | None = None  # (L, KV, S, D) cached keys, after RoPE (Needs.keys)
    evict: torch.Tensor | None = None  # (L, KV, S) bool: DMS decided to evict the slot out of its window (Needs.dms_window)
    slot_value: torch.Tensor | None = None  # (L, KV, S) what Needs.slot_value gave each slot's token

    @property
    def valid(self) -> torch.Tensor:
        return self.positions >= 0

    def per_slot(self, token_scores: torch.Tensor) -> torch.Tensor:
        """Spread one score per held token (N,) to every slot that holds it: (L, KV, S)."""
        index = torch.searchsorted(self.token_pos, self.positions.clamp(min=0))
        return token_scores[index.clamp(max=len(token_scores) - 1)]


class Policy:
    """An eviction policy: score(ctx) -> (L, KV, S), higher = keep. A score shared by every layer and head may be
    returned as a broadcast view."""

    needs = Needs()
    evicts = True  # False: the cache is never evicted (the full-cache baseline)
    anchors: Anchors | None = None  # the anchors a learned policy was trained with; None: the manager's
    budgeted = True  # False: the policy decides itself what goes (score -inf), with no budget and no anchors (dms)

    @classmethod
    def for_model(cls, model_dir, args) -> "Policy":
        """The policy for the model in model_dir (shape args); learned policies load their trained parts from there."""
        return cls()

    def to(self, device) -> "Policy":
        """Move what the policy computes with (trained components) to device; the rest follows the cache."""
        return self

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError
