"""Needle in a haystack: the Landmark passkey, a multi-key variant and a varied-filler variant."""
import random

from tinytis.tasks import Sample
from tinytis.tasks.text import NAMES, haystack, number

PASSKEY_NEEDLE = "The pass key is {k}. Remember it. {k} is the pass key."
PASSKEY_QUERY = "What is the pass key? The pass key is"
MULTIKEY_FACT = "The secret code of {name} is {code}."
MULTIKEY_QUERY = "What is the secret code of {name}? The secret code of {name} is"

VARIANTS = ("passkey", "multikey", "varied")


def passkey(rng: random.Random, length: int, depth: float, count, landmark_share: float = 1.0) -> Sample:
    k = number(rng)
    context = haystack(rng, length, count, [(depth, PASSKEY_NEEDLE.format(k=k))], landmark_share)
    return Sample("passkey", context, PASSKEY_QUERY, k, length, depth)


def multikey(rng: random.Random, length: int, depth: float, count, n_keys: int = 4, landmark_share: float = 0.3) -> Sample:
    """n_keys secret codes spread through the filler; the asked one sits at `depth`."""
    names = rng.sample(NAMES, n_keys)
    codes = [number(rng) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    facts = [(d, MULTIKEY_FACT.format(name=n, code=c)) for d, n, c in zip(depths, names, codes)]
    context = haystack(rng, length, count, facts, landmark_share)
    return Sample("multikey", context, MULTIKEY_QUERY.format(name=names[0]), codes[0], length, depth)


def make(variant: str, seed: int, length: int, depth: float, count) -> Sample:
    rng = random.Random(seed)
    if variant == "passkey":
        return passkey(rng, length, depth, count)
    if variant == "varied":
        s = passkey(rng, length, depth, count, landmark_share=0.0)
        s.task = "varied"
        return s
    return multikey(rng, length, depth, count)
