"""Eviction policies. Adding one is a module with a Policy subclass and a line in POLICIES."""
from pathlib import Path

from tinytis.errors import UserError
from tinytis.policies.attention import H2O, TOVA, SnapKV
from tinytis.policies.base import Needs, Policy, ScoreContext
from tinytis.policies.baselines import Full, Random, Streaming
from tinytis.policies.dms import DMSPolicy
from tinytis.policies.knorm import KNorm
from tinytis.policies.oracle import Oracle
from tinytis.policies.tis import TISPolicy
from tinytis.policies.trimkv import TrimKVPolicy

POLICIES = {
    "full": Full,
    "random": Random,
    "streaming": Streaming,
    "h2o": H2O,
    "tova": TOVA,
    "snapkv": SnapKV,
    "knorm": KNorm,
    "oracle": Oracle,
    "tis": TISPolicy,
    "dms": DMSPolicy,
    "trimkv": TrimKVPolicy,
}


def make_policy(name: str, model_dir=None, args=None, device="cpu") -> Policy:
    """A policy by name; one with trained components (tis, dms, trimkv) loads them from model_dir for a model of shape args,
    onto device. 'tis=FILE' loads the components from FILE instead (an ablation's, say)."""
    base, _, components = name.partition("=")
    if base not in POLICIES:
        raise UserError(f"unknown policy {base!r}; choose one of {', '.join(POLICIES)}")
    if components:
        if base != "tis":
            raise UserError(f"policy {name!r}: only tis takes a components file (tis=FILE)")
        return TISPolicy.from_file(Path(components), args).to(device)
    return POLICIES[base].for_model(model_dir, args).to(device)


__all__ = ["POLICIES", "make_policy", "Needs", "Policy", "ScoreContext", "TISPolicy", "TrimKVPolicy"]
