"""Several questions about one context: a pass key and named secret codes, asked one after another.

The context is compressed once; each answer the model gives stays in the cache before the next question, so
a cache that holds its budget while decoding must keep every fact through the earlier questions and answers.
Score: the fraction of the questions answered exactly.
"""
import random

from tinytis.tasks import Sample
from tinytis.tasks.niah import MULTIKEY_FACT, MULTIKEY_QUERY, PASSKEY_NEEDLE, PASSKEY_QUERY
from tinytis.tasks.text import NAMES, haystack, number

N_QUESTIONS = 4  # the pass key and three secret codes


def make(seed: int, length: int, count, n_codes: int = N_QUESTIONS - 1, landmark_share: float = 0.3) -> Sample:
    """A haystack of about `length` tokens with a pass key and n_codes secret codes at random depths; every fact
    is asked once, in a random order (the first is the sample's question, the rest its follow-ups)."""
    rng = random.Random(seed)
    key = number(rng)
    names = rng.sample(NAMES, n_codes)
    codes = [number(rng) for _ in names]
    facts = [(rng.random(), PASSKEY_NEEDLE.format(k=key))]
    facts += [(rng.random(), MULTIKEY_FACT.format(name=n, code=c)) for n, c in zip(names, codes)]
    asked = [(PASSKEY_QUERY, key)] + [(MULTIKEY_QUERY.format(name=n), c) for n, c in zip(names, codes)]
    rng.shuffle(asked)
    context = haystack(rng, length, count, facts, landmark_share)
    (question, answer), *follow_ups = asked
    return Sample("multiq", context, question, answer, length, -1.0, tuple(follow_ups))


def questions(sample: Sample) -> list[tuple[str, str]]:
    """Every (question, answer) of a sample, in the order they are asked."""
    return [(sample.question, sample.answer), *sample.follow_ups]


def score(predictions: list[str], sample: Sample) -> float:
    """Fraction of the sample's questions whose prediction (one per question, in order) is exactly the answer."""
    answers = [a for _, a in questions(sample)]
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    return sum(p.strip() == a for p, a in zip(predictions, answers)) / len(answers)
