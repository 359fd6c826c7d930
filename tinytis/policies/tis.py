"""TIS: the learned importance head scores each cached token per (layer, KV head) from its hidden state."""
from pathlib import Path

import torch

from tinytis.anchors import Anchors
from tinytis.errors import UserError
from tinytis.importance import COMPONENTS_FILE, TIS
from tinytis.policies.base import Needs, Policy


class TISPolicy(Policy):
    needs = Needs(hidden=True)

    def __init__(self, components: TIS):
        self.tis = components
        anchors = components.meta.get("anchors")
        self.anchors = Anchors(**anchors) if anchors else None  # evict as in training

    @classmethod
    def for_model(cls, model_dir, args) -> "TISPolicy":
        if model_dir is None:
            raise UserError("policy tis loads its trained components from the model directory; give the model")
        return cls.from_file(Path(model_dir) / COMPONENTS_FILE, args)

    @classmethod
    def from_file(cls, path: Path, args) -> "TISPolicy":
        return cls(TIS.load(path, args))

    def to(self, device) -> "TISPolicy":
        self.tis.to(device)
        return self

    @torch.no_grad()
    def score(self, ctx):
        token_scores = self.tis(ctx.hidden[None], ctx.token_ids[None])[0]  # (L, KV, N): one per held token
        index = torch.searchsorted(ctx.token_pos, ctx.positions.clamp(min=0))  # (L, KV, S): the token in each slot
        return token_scores.gather(-1, index.clamp(max=len(ctx.token_pos) - 1))
