"""DMS: the model decides per (layer, KV head) which tokens go (tinytis.dms); the policy frees them once they leave
the window. No budget: the compression is whatever the model decides."""
import math
from pathlib import Path

import torch

from tinytis.dms import DMSConfig
from tinytis.errors import UserError
from tinytis.policies.base import Needs, Policy


class DMSPolicy(Policy):
    budgeted = False

    def __init__(self, config: DMSConfig):
        self.config = config
        self.needs = Needs(dms_window=config.window_size)

    @classmethod
    def for_model(cls, model_dir, args) -> "DMSPolicy":
        if model_dir is None:
            raise UserError("policy dms reads dms_metadata.json from the DMS model's directory; give the model")
        return cls(DMSConfig.load(Path(model_dir), args))

    def score(self, ctx):
        # the next query (at last_pos + 1) no longer sees an evicted slot more than the window behind it
        gone = ctx.evict & (ctx.last_pos + 1 - ctx.positions > self.config.window_size)
        return torch.zeros(gone.shape, dtype=torch.float64, device=gone.device).masked_fill(gone, -math.inf)
