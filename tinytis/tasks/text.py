"""The words the synthetic tasks are made of, the filler grammar, and a token-budgeted haystack builder."""
import random

NAMES = """Emma Liam Olivia Noah Ava Ethan Sophia Mason Mia Lucas Amelia Oliver Harper Elijah Ella James Laura
Henry Chloe Jack Grace Leo Lily Owen Zoe Ruby Felix Nora Oscar Iris Hugo Clara Max Alice Theo Maya Ivan Rosa
Adam Vera""".split()
PLACES = """park library kitchen garden station market school harbor museum bakery castle forest beach bridge
church farm hospital office river tower valley village cellar attic theater stadium island cabin factory
meadow""".split()
OBJECTS = """key cup book lamp coin ring map hat box bell clock knife shell candle letter stone ribbon mirror
flute basket""".split()
COLORS = "red blue green yellow black white silver golden brown purple".split()
ANIMALS = "cat dog horse bird fox owl rabbit goat duck mouse".split()
ANIMAL_PLURALS = "cats dogs horses birds foxes owls rabbits goats ducks mice".split()
ADJECTIVES = "old small quiet busy tall bright cold warm happy tired".split()
VERBS = "sleeps walks sings waits rests plays runs sits looks stays".split()
LANDMARKS = "tree wall gate fence hill road lake field house window".split()
WEATHER = "rain wind snow sun fog".split()
TIMES = "morning evening night noon afternoon".split()

WORDS = NAMES + PLACES + OBJECTS + COLORS + ANIMALS  # the keys of the recall task

# The Landmark passkey filler, verbatim (REFERENCE.md).
LANDMARK_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def grammar_sentence(rng: random.Random) -> str:
    """One sentence of varied filler: plausible, fact-free, never mentions names, codes or keys."""
    a, i = rng.choice(ADJECTIVES), rng.randrange(len(ANIMALS))
    b, bs = ANIMALS[i], ANIMAL_PLURALS[i]
    templates = (
        f"The {a} {b} {rng.choice(VERBS)} near the {rng.choice(LANDMARKS)}.",
        f"In the {rng.choice(TIMES)} the {rng.choice(WEATHER)} comes over the {rng.choice(LANDMARKS)}.",
        f"A {rng.choice(COLORS)} {b} {rng.choice(VERBS)} by the {rng.choice(LANDMARKS)}.",
        f"The {rng.choice(LANDMARKS)} is {rng.choice(ADJECTIVES)} and {rng.choice(COLORS)}.",
        f"Every {rng.choice(TIMES)} the {b} {rng.choice(VERBS)} for a while.",
        f"Some {bs} like the {rng.choice(WEATHER)} but not the {rng.choice(WEATHER)}.",
    )
    return rng.choice(templates)


def filler_sentences(rng: random.Random, landmark_share: float):
    """An endless stream of filler sentences; a share of them are the Landmark filler block."""
    while True:
        yield LANDMARK_FILLER if rng.random() < landmark_share else grammar_sentence(rng)


def haystack(rng: random.Random, n_tokens: int, count, facts: list[tuple[float, str]], landmark_share: float) -> str:
    """Filler of about n_tokens tokens (count(text) -> tokens) with each fact inserted at its depth (0..1)."""
    return place_facts(filler_sentences(rng, landmark_share), n_tokens, count, facts)


def place_facts(sentences, n_tokens: int, count, facts: list[tuple[float, str]]) -> str:
    """Sentences from an endless stream up to about n_tokens tokens, each fact inserted at its depth (0..1).

    Sentences are whole words, so the token count of the joined text is the sum of the parts.
    """
    budget = n_tokens - sum(count(f) for _, f in facts)
    filler, used = [], 0
    for s in sentences:
        used += count(s)
        if used > budget:
            break
        filler.append(s)
    for depth, fact in sorted(facts, key=lambda x: x[0], reverse=True):
        filler.insert(round(depth * len(filler)), fact)
    return " ".join(filler)


def number(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))
