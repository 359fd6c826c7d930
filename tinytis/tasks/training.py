"""The training mix of the embedded model: the evaluation task families (on training seeds) plus two
training-only tasks, copy and associative recall, that teach the model to look things up."""
import random

from tinytis.tasks import Sample, litm, narrative, niah
from tinytis.tasks.seeds import TRAIN_SEEDS
from tinytis.tasks.text import ANIMALS, COLORS, NAMES, OBJECTS, PLACES, haystack, number

WORDS = NAMES + PLACES + OBJECTS + COLORS + ANIMALS
LITM_TOKENS_PER_DOC = 45  # about how long one litm document is; sets how many fit a length


def copy(rng: random.Random, length: int, count) -> Sample:
    """A random span, filler, then the span again: given its first word, continue it (induction)."""
    span = [rng.choice(WORDS) if rng.random() < 0.7 else number(rng, rng.randint(1, 5)) for _ in range(rng.randint(6, 12))]
    filler = haystack(rng, length - count(" ".join(span)), count, [], landmark_share=0.3)
    return Sample("copy", " ".join(span) + " " + filler, span[0], " ".join(span[1:]), length, 0.0)


def recall(rng: random.Random, length: int, count) -> Sample:
    """Key/value pairs (`melon 13 , mango 53 , ...`) in filler; one key is asked, its value answers."""
    keys = rng.sample(WORDS, rng.randint(4, 16))
    values = [number(rng, rng.randint(1, 3)) for _ in keys]
    pairs = " , ".join(f"{k} {v}" for k, v in zip(keys, values)) + " ."
    depth = rng.random()
    context = haystack(rng, length, count, [(depth, pairs)], landmark_share=0.3)
    i = rng.randrange(len(keys))
    return Sample("recall", context, keys[i], values[i], length, depth)


def sample(rng: random.Random, length: int, count, families=None) -> Sample:
    """One training sample of about `length` context tokens from a family drawn by weight."""
    weights = {"copy": 1, "recall": 1, "passkey": 1, "varied": 1, "multikey": 2, "narrative": 2, "litm": 2}
    families = families or list(weights)
    family = rng.choices(families, [weights[f] for f in families])[0]
    seed, depth = rng.randrange(TRAIN_SEEDS.stop), rng.random()
    if family == "copy":
        return copy(rng, length, count)
    if family == "recall":
        return recall(rng, length, count)
    if family == "narrative":
        return narrative.make(seed, length, depth, count)
    if family == "litm":
        n_docs = max(2, min(len(NAMES), length // LITM_TOKENS_PER_DOC))
        return litm.make(seed, n_docs, rng.randrange(n_docs))
    return niah.make(family, seed, length, depth, count)
