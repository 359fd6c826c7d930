"""Fidelity: held-out text of the training distribution, continued after the compressed context.

A sample is a passkey, multi-key or story context at a random depth; the continuation is its
question and answer, teacher-forced. KL(full || evicted), top-1 agreement and perplexity are taken
over the continuation tokens.
"""
import random

from tinytis.tasks import Sample, narrative, niah


def make(seed: int, length: int, count) -> Sample:
    rng = random.Random(seed)
    kind, depth = rng.choice(("passkey", "multikey", "narrative")), rng.random()
    if kind == "narrative":
        s = narrative.make(seed, length, depth, count)
    else:
        s = niah.make(kind, seed, length, depth, count)
    s.task = "fidelity"
    return s
