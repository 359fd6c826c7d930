"""The held-out prompt family is disjoint from everything training draws, and the TIS training mix covers its range.

Sentences are compared as templates: names, places, objects, colours and numbers (shared by design: they are what
is asked) are replaced by placeholders first, so a held-out sentence matches a training one only if it is written
the same way.
"""
import random
import re
from collections import Counter

from tinytis.tasks import heldout, litm, multiq, narrative, niah, text, tis_mix, training

COUNT = lambda s: len(s.split())  # a stand-in tokenizer: haystacks only need a count per text
SLOTS = {**{w: "<name>" for w in text.NAMES}, **{w: "<place>" for w in text.PLACES},
         **{w: "<obj>" for w in text.OBJECTS}, **{w: "<color>" for w in text.COLORS}}


def templates(context: str) -> set[str]:
    """The context's sentences with their slot words and numbers replaced."""
    sentences = re.split(r"(?<=[.!?])\s+", context)
    return {" ".join("#" if re.fullmatch(r"\d+[.,]?", w) else SLOTS.get(w.strip(".,"), w) for w in s.split())
            for s in sentences if s}


def training_contexts(n: int = 600):
    """What the embedded model's and TIS's training draw (training.sample, every family) and the broader mix."""
    rng = random.Random(0)
    for i in range(n):
        length = rng.randint(64, 1024)
        yield training.sample(rng, length, COUNT, list(training.WEIGHTS)).context
        yield tis_mix.sample(rng, length, COUNT).context


def heldout_contexts(n: int = 60):
    rng = random.Random(1)
    for i in range(n):
        seed, length, depth = rng.randrange(10**9), rng.randint(64, 1024), rng.random()
        for variant in ("passkey", "varied", "multikey"):
            yield heldout.FAMILY.niah(variant, seed, length, depth, COUNT).context
        yield heldout.FAMILY.narrative(seed, length, depth, COUNT).context
        yield heldout.FAMILY.litm(seed, rng.randint(2, 30), 0).context
        yield heldout.FAMILY.multiq(seed, length, COUNT).context


def fact_templates() -> set[str]:
    """The facts as the evaluation states them (the needle, the keyed facts, the documents): shared by design, since
    held-out prompts hide the same facts in other text."""
    rng = random.Random(2)
    contexts = [niah.make(v, rng.randrange(10**9), 400, 0.5, COUNT).context for v in ("passkey", "multikey")
                for _ in range(20)]
    contexts += [narrative.make(rng.randrange(10**9), 400, 0.5, COUNT).context for _ in range(20)]
    contexts += [litm.make(rng.randrange(10**9), 30, 0).context for _ in range(20)]
    facts = {t for t in set().union(*map(templates, contexts)) if re.search(r"<\w+>|#", t)}
    return facts | templates(niah.PASSKEY_NEEDLE.format(k=12345))  # its "Remember it." too


def test_no_heldout_sentence_is_drawn_in_training():
    seen = set().union(*map(templates, training_contexts()))
    held = set().union(*map(templates, heldout_contexts()))
    assert len(held) > 200  # the filler alone has hundreds of distinct sentences
    shared = held & seen
    assert shared and shared <= fact_templates(), sorted(shared - fact_templates())[:5]


def test_heldout_filler_words_are_not_training_words():
    training_words = {w.strip(".,:").lower() for c in training_contexts(200) for w in c.split()}
    filler = (heldout.VEHICLES + heldout.PLANTS + heldout.MATERIALS + heldout.MOTIONS + heldout.SEASONS
              + heldout.SHADES + heldout.PATHS + heldout.SKIES + heldout.SOUNDS)
    assert not set(filler) & training_words


def test_heldout_samples_are_answerable_and_scored_as_in_distribution():
    s = heldout.FAMILY.multiq(7, 400, COUNT)
    assert all(answer in s.context for _, answer in multiq.questions(s))
    assert multiq.score([a for _, a in multiq.questions(s)], s) == 1.0
    for variant in ("passkey", "varied", "multikey"):
        s = heldout.FAMILY.niah(variant, 7, 400, 0.5, COUNT)
        assert s.task == variant and s.answer in s.context and s.context.startswith(heldout.INTROS)
        assert 380 <= COUNT(s.context) <= 400
    assert heldout.FAMILY.niah("passkey", 7, 400, 0.5, COUNT).context == heldout.FAMILY.niah("passkey", 7, 400, 0.5, COUNT).context


def test_tis_mix_covers_tasks_fillers_intros_and_depths():
    rng = random.Random(3)
    samples = [tis_mix.sample(rng, rng.randint(128, 1024), COUNT) for _ in range(400)]
    tasks = Counter(s.task for s in samples)
    assert set(tasks) == set(tis_mix.TASKS)
    assert all(s.answer in s.context for s in samples)
    assert 0.35 < sum(s.context.startswith(tis_mix.INTROS) for s in samples) / len(samples) < 0.65
    depths = [s.depth for s in samples]
    assert depths.count(0.0) > 10 and depths.count(1.0) > 10 and min(d for d in depths if d > 0) < 0.05
    assert sum(0.4 < d < 0.6 for d in depths) > 20
    keyed = [s for s in samples if s.task in ("passkey", "recall")]
    assert all(COUNT(s.context) <= s.length for s in keyed) and all(COUNT(s.context) > s.length - 60 for s in keyed)
    shuffled = [s for s in samples if "Here we go. The grass is green." in s.context]  # a Landmark block reordered
    repeated = [s for s in samples if Counter(s.context.split(". ")).most_common(1)[0][1] > 0.8 * s.context.count(". ")]
    assert shuffled and repeated
    again = random.Random(3)
    assert tis_mix.sample(again, again.randint(128, 1024), COUNT).context == samples[0].context  # a function of rng
