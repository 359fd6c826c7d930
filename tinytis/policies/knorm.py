"""Knorm: keys with a small L2 norm tend to draw attention, so keep the lowest-norm keys."""
from tinytis.policies.base import Needs, Policy


class KNorm(Policy):
    needs = Needs(keys=True)

    def score(self, ctx):
        return -ctx.keys.norm(dim=-1)
