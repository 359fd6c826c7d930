"""The broader TIS training mix: the keyed tasks (passkey, multikey, narrative, litm, recall) in several filler
styles (real prose from the standard library's training split among them) and sentence orders, with or without an
intro, the asked fact anywhere from the first sentence to the last.

It states the facts with the evaluation's templates and never draws from the held-out family (heldout.py) or the
evaluation split of the prose, so the held-out rows of eval.py measure what TIS does on text no training stage has
seen.
"""
import random
from itertools import repeat

from tinytis.tasks import Sample, prose, style
from tinytis.tasks.seeds import TRAIN_SEEDS
from tinytis.tasks.style import EVAL_TEMPLATES, Style, mixed_filler
from tinytis.tasks.text import LANDMARK_FILLER, grammar_sentence

LANDMARK_SENTENCES = [s + "." for s in LANDMARK_FILLER.rstrip(".").split(". ")]
INTROS = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
          "I will quiz you about the important information there.",  # the Landmark passkey intro
          "The text below is long. Some facts are hidden in it.",
          "Read the following text and remember the facts in it.")
INTRO_SHARE = 0.5
END_SHARE = 0.2  # of the facts sit exactly at the start or at the end of the context (depth 0 or 1)
TASKS = {"passkey": 2, "multikey": 2, "narrative": 2, "litm": 2, "recall": 1}  # task -> weight


def shuffled_block(rng: random.Random) -> str:
    """The Landmark filler block with its sentences in a random order."""
    return " ".join(rng.sample(LANDMARK_SENTENCES, len(LANDMARK_SENTENCES)))


def landmark_or_grammar_sentence(rng: random.Random) -> str:
    return rng.choice(LANDMARK_SENTENCES) if rng.random() < 0.5 else grammar_sentence(rng)


FILLERS = {  # name -> endless filler stream of one sample
    "landmark": lambda rng: mixed_filler(rng, LANDMARK_FILLER, grammar_sentence, 1.0),
    "landmark_shuffled": lambda rng: mixed_filler(rng, "", shuffled_block, 0.0),
    "grammar": lambda rng: mixed_filler(rng, "", grammar_sentence, 0.0),
    "mixed": lambda rng: mixed_filler(rng, LANDMARK_FILLER, grammar_sentence, rng.choice((0.3, 0.7))),
    "sentences": lambda rng: mixed_filler(rng, "", landmark_or_grammar_sentence, 0.0),  # Landmark's, one at a time
    "repeated": lambda rng: repeat(grammar_sentence(rng)),  # one sentence over and over
    "prose": lambda rng: prose.filler(rng, "train"),  # the standard library's training split
}


def make_style(rng: random.Random) -> Style:
    filler = FILLERS[rng.choice(list(FILLERS))](rng)
    return Style(EVAL_TEMPLATES, filler, rng.choice(INTROS) if rng.random() < INTRO_SHARE else "")


def sample(rng: random.Random, length: int, count) -> Sample:
    """One training sample of about `length` context tokens (count(text) -> tokens): a task drawn by weight, a
    filler style, maybe an intro, a depth over the whole range. The sample is a function of a training seed."""
    task = rng.choices(list(TASKS), list(TASKS.values()))[0]
    r = random.Random(rng.randrange(TRAIN_SEEDS.start, TRAIN_SEEDS.stop))
    sty = make_style(r)
    depth = r.choice((0.0, 1.0)) if r.random() < END_SHARE else r.random()
    return style.keyed(task, r, sty, length, depth, count)
