"""TRIM-KV: each token's retention beta (per layer and KV head) is predicted when the token is written; at time t the
token scores log(beta^(t - i)) = (t - i) log beta, t the position of the next query (tinytis/trimkv.py)."""
from tinytis.errors import UserError
from tinytis.policies.base import Needs, Policy
from tinytis.trimkv import RetentionGates


class TrimKVPolicy(Policy):
    def __init__(self, gates: RetentionGates):
        self.gates = gates
        self.needs = Needs(slot_value=gates.log_beta)

    @classmethod
    def for_model(cls, model_dir, args) -> "TrimKVPolicy":
        if model_dir is None:
            raise UserError("policy trimkv loads its retention gates from the model directory; give the model")
        return cls(RetentionGates.load(model_dir, args))

    def to(self, device) -> "TrimKVPolicy":
        self.gates.to(device)
        return self

    def score(self, ctx):
        return (ctx.last_pos + 1 - ctx.positions) * ctx.slot_value  # (L, KV, S): log alpha of each slot
