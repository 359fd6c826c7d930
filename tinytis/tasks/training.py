"""The training mix of the embedded model: the evaluation task families (on training seeds) plus two
training-only tasks, copy and associative recall, that teach the model to look things up."""
import random

from tinytis.tasks import Sample, litm, narrative, niah
from tinytis.tasks.seeds import TRAIN_SEEDS
from tinytis.tasks.text import ANIMALS, COLORS, NAMES, OBJECTS, PLACES, haystack, number

WORDS = NAMES + PLACES + OBJECTS + COLORS + ANIMALS
KEYS = NAMES + PLACES + OBJECTS  # words the filler never uses, so a recall key occurs once
LITM_TOKENS_PER_DOC = 45  # about how long one litm document is; sets how many fit a length
FOLLOWUPS = 4  # questions asked after the first one, about other facts of the same context
WEIGHTS = {"copy": 1, "recall": 1, "passkey": 1, "varied": 1, "multikey": 2, "narrative": 2, "litm": 2}


def copy(rng: random.Random, length: int, count) -> Sample:
    """A random span, filler, then the span again: given its first word, continue it (induction)."""
    span = [rng.choice(WORDS) if rng.random() < 0.7 else number(rng, rng.randint(1, 5)) for _ in range(rng.randint(6, 12))]
    filler = haystack(rng, length - count(" ".join(span)), count, [], landmark_share=0.3)
    return Sample("copy", " ".join(span) + " " + filler, span[0], " ".join(span[1:]), length, 0.0)


def recall(rng: random.Random, length: int, count) -> Sample:
    """Key/value pairs (`melon 13 , mango 53 , ...`) in filler; one key is asked, its value answers."""
    keys = rng.sample(KEYS, rng.randint(4, 16))
    values = [number(rng, rng.randint(1, 3)) for _ in keys]
    pairs = " , ".join(f"{k} {v}" for k, v in zip(keys, values)) + " ."
    depth = rng.random()
    context = haystack(rng, length, count, [(depth, pairs)], landmark_share=0.3)
    i = rng.randrange(len(keys))
    followups = [(k, v) for j, (k, v) in enumerate(zip(keys, values)) if j != i]
    return Sample("recall", context, keys[i], values[i], length, depth, followups)


def sample(rng: random.Random, length: int, count, families=None) -> Sample:
    """One training sample of about `length` context tokens from a family drawn by weight, with up to FOLLOWUPS
    of its follow-up questions: several answers per context give the keyed lookups more signal per step."""
    families = families or list(WEIGHTS)
    family = rng.choices(families, [WEIGHTS[f] for f in families])[0]
    seed, depth = rng.randrange(TRAIN_SEEDS.stop), rng.random()
    if family == "copy":
        s = copy(rng, length, count)
    elif family == "recall":
        s = recall(rng, length, count)
    elif family == "narrative":
        s = narrative.make(seed, length, depth, count)
    elif family == "litm":
        n_docs = max(2, min(len(NAMES), length // LITM_TOKENS_PER_DOC))
        s = litm.make(seed, n_docs, rng.randrange(n_docs))
    else:
        s = niah.make(family, seed, length, depth, count)
    s.followups = rng.sample(s.followups, min(FOLLOWUPS, len(s.followups)))
    return s
