"""Oracle: the attention mass the reference answer puts on each context token, in a full-cache pass over
context + answer. It sees the answer, so it is an upper bound for query-agnostic policies, not a method."""
from tinytis.policies.base import Needs, Policy


class Oracle(Policy):
    needs = Needs(reference=True)

    def score(self, ctx):
        return ctx.window.mean(-1)  # summed over the answer's queries, mean over the GQA group
