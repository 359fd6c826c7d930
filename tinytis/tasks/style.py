"""The keyed tasks written in a chosen style: fact templates, filler and intro.

The evaluation generators (niah, narrative, litm, multiq) write their tasks one way, the project's own. The held-out
family (heldout.py) and the broader TIS training mix (tis_mix.py) build the same tasks from other templates, other
filler and an intro, with the same questions and answers, so a prediction is scored the same way.
"""
import random
from dataclasses import dataclass
from typing import Callable, Iterator

from tinytis.tasks import Sample
from tinytis.tasks.litm import DOC_FACT, QUERY as LITM_QUERY, docs_for
from tinytis.tasks.multiq import N_QUESTIONS
from tinytis.tasks.narrative import EVENTS
from tinytis.tasks.niah import MULTIKEY_FACT, MULTIKEY_QUERY, PASSKEY_NEEDLE, PASSKEY_QUERY
from tinytis.tasks.text import COLORS, NAMES, OBJECTS, PLACES, WORDS, number, place_facts


@dataclass(frozen=True)
class Templates:
    """How the facts are stated; each fact draws one of its templates."""

    passkey: tuple[str, ...]  # {k}
    multikey: tuple[str, ...]  # {name} {code}
    events: tuple[tuple[str, ...], ...]  # per kind of narrative.EVENTS (go, find, meet): {name} {place} {color} {obj} {friend}
    doc_fact: tuple[str, ...]  # {name} {obj} {place}
    doc_header: str  # {i}


EVAL_TEMPLATES = Templates((PASSKEY_NEEDLE,), (MULTIKEY_FACT,), tuple((e,) for e, _, _ in EVENTS), (DOC_FACT,),
                           "Document {i}:")

# the base model's prose tasks state each fact in one of several shapes, the evaluation's among them, so that it
# learns to look a fact up by its key (the pass key, a name) rather than by one sentence shape
TRAIN_TEMPLATES = Templates(
    passkey=(PASSKEY_NEEDLE, "The pass key is {k}.", "Remember this: the pass key is {k}.",
             "{k} is the pass key. Keep it in mind.", "Note that the pass key is {k}, and do not forget it."),
    multikey=(MULTIKEY_FACT, "{name}'s secret code is {code}.", "Remember that the secret code of {name} is {code}.",
              "The secret code of {name}, written down here, is {code}.", "For {name}, the secret code is {code}."),
    events=(("{name} went to the {place}.", "Later, {name} went to the {place}.", "That day {name} went to the {place}."),
            ("{name} found a {color} {obj}.", "At some point {name} found a {color} {obj}.",
             "{name} found a {color} {obj} and kept it."),
            ("{name} met {friend} at the {place}.", "At the {place}, {name} met {friend}.",
             "{name} met {friend} at the {place} by chance.")),
    doc_fact=(DOC_FACT, "{name} always keeps the {obj} in the {place}.", "In the {place} {name} keeps the {obj}."),
    doc_header="Document {i}:")


@dataclass
class Style:
    """One sample's way of writing: its templates, an endless stream of filler sentences, an intro ('' for none)."""

    templates: Templates
    filler: Iterator[str]
    intro: str = ""


def mixed_filler(rng: random.Random, block: str, sentence, block_share: float) -> Iterator[str]:
    """Endless filler: the repeated block with probability block_share, else a fresh sentence(rng)."""
    while True:
        yield block if rng.random() < block_share else sentence(rng)


def context(style: Style, length: int, count, facts: list[tuple[float, str]]) -> str:
    """The intro, then filler of about `length` tokens in all with each fact at its depth."""
    if not style.intro:
        return place_facts(style.filler, length, count, facts)
    return style.intro + " " + place_facts(style.filler, length - count(style.intro), count, facts)


def passkey(rng: random.Random, style: Style, length: int, depth: float, count, task: str = "passkey") -> Sample:
    k = number(rng)
    needle = rng.choice(style.templates.passkey).format(k=k)
    return Sample(task, context(style, length, count, [(depth, needle)]), PASSKEY_QUERY, k, length, depth)


def multikey(rng: random.Random, style: Style, length: int, depth: float, count, n_keys: int = 4) -> Sample:
    """n_keys secret codes in the filler; the asked one sits at `depth`."""
    names = rng.sample(NAMES, n_keys)
    codes = [number(rng) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    facts = [(d, rng.choice(style.templates.multikey).format(name=n, code=c)) for d, n, c in zip(depths, names, codes)]
    return Sample("multikey", context(style, length, count, facts), MULTIKEY_QUERY.format(name=names[0]), codes[0],
                  length, depth)


def narrative(rng: random.Random, style: Style, length: int, depth: float, count, n_characters: int = 6) -> Sample:
    """A story: every character has one event of each kind; one event of the first character is asked, at `depth`."""
    names = rng.sample(NAMES, 2 * n_characters)
    kind = rng.randrange(len(EVENTS))
    facts = []
    for i, name in enumerate(names[:n_characters]):
        slots = {"name": name, "place": rng.choice(PLACES), "color": rng.choice(COLORS), "obj": rng.choice(OBJECTS),
                 "friend": names[n_characters + i]}
        slots["thing"] = f"{slots['color']} {slots['obj']}"
        for j, (_, query, field) in enumerate(EVENTS):
            event = rng.choice(style.templates.events[j]).format(**slots)
            if i == 0 and j == kind:
                facts.append((depth, event))
                question, answer = query.format(**slots), slots[field]
            else:
                facts.append((rng.random(), event))
    return Sample("narrative", context(style, length, count, facts), question, answer, length, depth)


def litm(rng: random.Random, style: Style, n_docs: int, gold: int, sentences_per_doc: int = 3) -> Sample:
    """n_docs short documents of filler, each with one person's fact; document `gold` (0-based) is asked."""
    facts = [(name, rng.choice(OBJECTS), rng.choice(PLACES)) for name in rng.sample(NAMES, n_docs)]
    docs = [style.intro] if style.intro else []
    for i, (name, obj, place) in enumerate(facts):
        body = [next(style.filler) for _ in range(sentences_per_doc)]
        body.insert(rng.randrange(sentences_per_doc + 1), rng.choice(style.templates.doc_fact).format(
            name=name, obj=obj, place=place))
        docs.append(style.templates.doc_header.format(i=i + 1) + " " + " ".join(body))
    name, obj, place = facts[gold]
    return Sample("litm", " ".join(docs), LITM_QUERY.format(name=name, obj=obj), place, n_docs, gold / max(n_docs - 1, 1))


def multiq(rng: random.Random, style: Style, length: int, count, n_codes: int = N_QUESTIONS - 1) -> Sample:
    """A pass key and n_codes secret codes at random depths, every one asked in turn (tinytis.tasks.multiq)."""
    key = number(rng)
    names = rng.sample(NAMES, n_codes)
    codes = [number(rng) for _ in names]
    facts = [(rng.random(), rng.choice(style.templates.passkey).format(k=key))]
    facts += [(rng.random(), rng.choice(style.templates.multikey).format(name=n, code=c)) for n, c in zip(names, codes)]
    asked = [(PASSKEY_QUERY, key)] + [(MULTIKEY_QUERY.format(name=n), c) for n, c in zip(names, codes)]
    rng.shuffle(asked)
    (question, answer), *follow_ups = asked
    return Sample("multiq", context(style, length, count, facts), question, answer, length, -1.0, tuple(follow_ups))


def recall(rng: random.Random, style: Style, length: int, depth: float, count) -> Sample:
    """Key/value pairs (`melon 13 , mango 53 , ...`) at `depth`; one key is asked, its value answers."""
    keys = rng.sample(WORDS, rng.randint(4, 16))
    values = [number(rng, rng.randint(1, 3)) for _ in keys]
    pairs = " , ".join(f"{k} {v}" for k, v in zip(keys, values)) + " ."
    i = rng.randrange(len(keys))
    return Sample("recall", context(style, length, count, [(depth, pairs)]), keys[i], values[i], length, depth)


def keyed(task: str, rng: random.Random, style: Style, length: int, depth: float, count) -> Sample:
    """One sample of a keyed task (passkey, multikey, narrative, litm, recall) in `style`, the asked fact at depth."""
    if task == "litm":
        n_docs = docs_for(length)
        return litm(rng, style, n_docs, round(depth * (n_docs - 1)))
    return {"passkey": passkey, "multikey": multikey, "narrative": narrative, "recall": recall}[task](
        rng, style, length, depth, count)


@dataclass(frozen=True)
class Family:
    """A prompt family: every evaluation task written in the styles that make_style(rng, block_share) draws, with
    the evaluation generators' signatures (tinytis.evaluate.GENERATORS). block_share is the share of the family's
    repeated block in the filler (1 for passkey, 0 for varied and the stories, 0.3 for multikey), where it has one."""

    make_style: Callable[[random.Random, float], Style]

    def niah(self, variant: str, seed: int, length: int, depth: float, count) -> Sample:
        """passkey, varied or multikey, as tasks.niah."""
        rng = random.Random(seed)
        if variant == "multikey":
            return multikey(rng, self.make_style(rng, 0.3), length, depth, count)
        return passkey(rng, self.make_style(rng, 1.0 if variant == "passkey" else 0.0), length, depth, count, variant)

    def narrative(self, seed: int, length: int, depth: float, count) -> Sample:
        rng = random.Random(seed)
        return narrative(rng, self.make_style(rng, 0.0), length, depth, count)

    def litm(self, seed: int, n_docs: int, gold: int) -> Sample:
        rng = random.Random(seed)
        return litm(rng, self.make_style(rng, 0.0), n_docs, gold)

    def multiq(self, seed: int, length: int, count) -> Sample:
        rng = random.Random(seed)
        return multiq(rng, self.make_style(rng, 0.3), length, count)

    def fidelity(self, seed: int, length: int, count) -> Sample:
        """A passkey, multi-key or story context at a random depth, its question and answer the continuation."""
        rng = random.Random(seed)
        kind, depth = rng.choice(("passkey", "multikey", "narrative")), rng.random()
        s = self.narrative(seed, length, depth, count) if kind == "narrative" else self.niah(kind, seed, length, depth, count)
        s.task = "fidelity"
        return s
