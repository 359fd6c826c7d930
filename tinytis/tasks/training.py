"""The training mix of the embedded model: the evaluation task families (on training seeds) plus two
training-only tasks, copy (token-level induction) and associative recall, that teach the model to look things up."""
import random

from tinytis.tasks import Sample, litm, narrative, niah
from tinytis.tasks.seeds import TRAIN_SEEDS
from tinytis.tasks.text import ANIMALS, COLORS, NAMES, OBJECTS, PLACES, haystack, number

WORDS = NAMES + PLACES + OBJECTS + COLORS + ANIMALS
LITM_TOKENS_PER_DOC = 45  # about how long one litm document is; sets how many fit a length


def copy(rng: random.Random, length: int, tok, depth: float | None = None) -> tuple[list[int], int]:
    """Induction, at the token level: a span of 8-31 random token ids (any id but <unk>, BOS and EOS) sits at a
    random point in filler and ends the sequence again; given its first token, continue it.

    -> (ids = BOS filler-with-span span, where the answer starts): the loss covers tokens 2..n of the repeat. The
    span's place is random (or at `depth` of the filler, for a probe), so the model must find it by content.
    """
    special = {tok.sp.unk_id(), tok.bos_id, tok.eos_id}
    allowed = [i for i in range(tok.vocab_size) if i not in special]
    span = [rng.choice(allowed) for _ in range(rng.randint(8, 31))]
    count = lambda s: len(tok.encode(s, bos=False))
    filler = tok.encode(haystack(rng, length - 2 * len(span), count, [], landmark_share=0.3), bos=False)
    at = rng.randrange(len(filler) + 1) if depth is None else round(depth * len(filler))
    ids = [tok.bos_id] + filler[:at] + span + filler[at:] + span
    return ids, len(ids) - len(span) + 1


def recall(rng: random.Random, length: int, count) -> Sample:
    """Key/value pairs (`melon 13 , mango 53 , ...`) in filler; one key is asked, its value answers."""
    keys = rng.sample(WORDS, rng.randint(4, 16))
    values = [number(rng, rng.randint(1, 3)) for _ in keys]
    pairs = " , ".join(f"{k} {v}" for k, v in zip(keys, values)) + " ."
    depth = rng.random()
    context = haystack(rng, length, count, [(depth, pairs)], landmark_share=0.3)
    i = rng.randrange(len(keys))
    return Sample("recall", context, keys[i], values[i], length, depth)


# the families' weights where a caller names families without weights (the TIS stages)
WEIGHTS = {"recall": 1, "passkey": 1, "varied": 1, "multikey": 2, "narrative": 2, "litm": 2}


def sample(rng: random.Random, length: int, count, families, seeds: range = TRAIN_SEEDS) -> Sample:
    """One text sample of about `length` context tokens from a family drawn by weight. families: a list of
    names (weighted by WEIGHTS) or a {name: weight} mix. seeds: the range the generator's seed is drawn from; a
    held-out evaluation of the mix passes EVAL_SEEDS."""
    mix = families if isinstance(families, dict) else {f: WEIGHTS[f] for f in families}
    family = rng.choices(list(mix), list(mix.values()))[0]
    seed, depth = rng.randrange(seeds.start, seeds.stop), rng.random()
    if family == "recall":
        return recall(rng, length, count)
    if family == "narrative":
        return narrative.make(seed, length, depth, count)
    if family == "litm":
        n_docs = max(2, min(len(NAMES), length // LITM_TOKENS_PER_DOC))
        return litm.make(seed, n_docs, rng.randrange(n_docs))
    return niah.make(family, seed, length, depth, count)
