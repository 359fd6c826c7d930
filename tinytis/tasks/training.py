"""The training mix of the embedded model: the evaluation task families (on training seeds), the same keyed tasks
written into real prose (the standard library's training split, facts in several shapes), plain prose as language
model text, and two training-only tasks, copy (token-level induction) and associative recall, that teach the model
to look things up."""
import random

from tinytis.tasks import Sample, litm, narrative, niah, prose, style
from tinytis.tasks.seeds import TRAIN_SEEDS
from tinytis.tasks.style import TRAIN_TEMPLATES, Style
from tinytis.tasks.text import filler_sentences, haystack

PROSE_TASKS = {"passkey": 3, "multikey": 3, "narrative": 2, "litm": 1, "recall": 1}  # task -> weight, in prose


def copy(rng: random.Random, length: int, tok, depth: float | None = None, in_prose: bool = False
         ) -> tuple[list[int], int]:
    """Induction, at the token level: a span of 8-31 random token ids (any id but <unk>, BOS and EOS) sits at a
    random point in filler and ends the sequence again; given its first token, continue it.

    -> (ids = BOS filler-with-span span, where the answer starts): the loss covers tokens 2..n of the repeat. The
    span's place is random (or at `depth` of the filler, for a probe), so the model must find it by content.
    The filler is the synthetic grammar, or training prose with in_prose.
    """
    special = {tok.sp.unk_id(), tok.bos_id, tok.eos_id}
    allowed = [i for i in range(tok.vocab_size) if i not in special]
    span = [rng.choice(allowed) for _ in range(rng.randint(8, 31))]
    count = lambda s: len(tok.encode(s, bos=False))
    n = length - 2 * len(span)
    text = prose.passage(rng, "train", n, count) if in_prose else haystack(rng, n, count, [], landmark_share=0.3)
    filler = tok.encode(text, bos=False)[:n]
    at = rng.randrange(len(filler) + 1) if depth is None else round(depth * len(filler))
    ids = [tok.bos_id] + filler[:at] + span + filler[at:] + span
    return ids, len(ids) - len(span) + 1


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
        return style.recall(rng, Style(TRAIN_TEMPLATES, filler_sentences(rng, 0.3)), length, depth, count)
    if family == "narrative":
        return narrative.make(seed, length, depth, count)
    if family == "litm":
        n_docs = litm.docs_for(length)
        return litm.make(seed, n_docs, rng.randrange(n_docs))
    if family == "prose":
        return in_prose(random.Random(seed), length, depth, count)
    return niah.make(family, seed, length, depth, count)


def in_prose(rng: random.Random, length: int, depth: float, count) -> Sample:
    """A keyed task written into training prose, its facts in one of TRAIN_TEMPLATES' shapes."""
    task = rng.choices(list(PROSE_TASKS), list(PROSE_TASKS.values()))[0]
    return style.keyed(task, rng, Style(TRAIN_TEMPLATES, prose.filler(rng, "train")), length, depth, count)


def language(rng: random.Random, length: int, tok) -> tuple[list[int], int]:
    """Plain training prose of `length` tokens as language-model text: (ids, 1), the loss on every next token."""
    count = lambda s: len(tok.encode(s, bos=False))
    return [tok.bos_id] + tok.encode(prose.passage(rng, "train", length, count), bos=False)[:length - 1], 1
