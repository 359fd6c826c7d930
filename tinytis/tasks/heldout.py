"""The held-out prompt family: every evaluation task, written so that no training stage has seen its text.

Other filler (its own words, sentence templates and repeated block) and an intro sentence around facts stated as the
evaluation states them; the questions and answers are those of the in-distribution tasks, so predictions are scored
alike. Nothing in
tinytis/tasks/training.py or tis_mix.py draws from this module (tests/test_heldout.py checks it).
"""
import random

from tinytis.tasks.style import EVAL_TEMPLATES, Family, Style, mixed_filler

# filler words: none of them is in tinytis/tasks/text.py
VEHICLES = "boat wagon truck canoe sled carriage barge tram".split()
PLANTS = "oak pine rose tulip fern maple ivy willow cedar birch".split()
MATERIALS = "wooden copper marble paper woolen tin".split()
MOTIONS = "drifts glides leans sways rolls bends fades creaks".split()
SEASONS = "spring summer autumn winter".split()
SHADES = "amber crimson pale dusky violet".split()
PATHS = "lane trail canal ridge dock pier hedgerow orchard".split()
SKIES = "clouds stars moon dusk dawn".split()
SOUNDS = "whistle hum rustle echo chime".split()

BLOCK = "Clouds drift over the ridge. The canal is calm today. Leaves fall in autumn. On and on it goes. Round once more."

INTROS = ("What follows is a long record; one detail in it will be asked about at the end.",
          "Below are some notes. Most of them do not matter, but one does.",
          "Keep reading until the end, since a single line here is worth remembering.")


def sentence(rng: random.Random) -> str:
    """One held-out filler sentence: fact-free, in words the training text never uses."""
    v, p, m = rng.choice(VEHICLES), rng.choice(PLANTS), rng.choice(MATERIALS)
    return rng.choice((
        f"Beside the {p}, an empty {v} {rng.choice(MOTIONS)} slowly.",
        f"During {rng.choice(SEASONS)} the {p} turns {rng.choice(SHADES)}.",
        f"A {m} {v} {rng.choice(MOTIONS)} along the {rng.choice(PATHS)}.",
        f"Under the {rng.choice(SKIES)}, a faint {rng.choice(SOUNDS)} rises from the {rng.choice(PATHS)}.",
        f"Each {rng.choice(SEASONS)} brings {rng.choice(SHADES)} light to the {rng.choice(PATHS)}.",
        f"Nobody recalls when the {m} {v} arrived.",
    ))


def make_style(rng: random.Random, block_share: float) -> Style:
    # the facts are stated as in the evaluation (the Landmark needle, the keyed facts, "Document {i}:"): what is
    # held out is the text around them, as with passkey prompts from another generator
    return Style(EVAL_TEMPLATES, mixed_filler(rng, BLOCK, sentence, block_share), rng.choice(INTROS))


FAMILY = Family(make_style)
