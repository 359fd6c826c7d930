"""The real-prose prompt family: every evaluation task with its facts stated as the evaluation states them, in
consecutive English prose from the standard library's evaluation split (tinytis.tasks.prose), which no training
stage reads. It has no repeated block: the passkey, varied and multikey prompts differ only in their facts."""
import random

from tinytis.tasks import prose
from tinytis.tasks.style import EVAL_TEMPLATES, Family, Style


def make_style(rng: random.Random, block_share: float) -> Style:
    return Style(EVAL_TEMPLATES, prose.filler(rng, "eval"))


FAMILY = Family(make_style)
