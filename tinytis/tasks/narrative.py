"""Short generated stories with a question whose answer the story states once; scored with qa_f1 and EM."""
import random
import re
import string
from collections import Counter

from tinytis.tasks import Sample
from tinytis.tasks.text import COLORS, NAMES, OBJECTS, PLACES, haystack

# (event sentence, question, reference answer field)
EVENTS = (
    ("{name} went to the {place}.", "Where did {name} go? {name} went to the", "place"),
    ("{name} found a {color} {obj}.", "What did {name} find? {name} found a", "thing"),
    ("{name} met {friend} at the {place}.", "Who did {name} meet? {name} met", "friend"),
)


def make(seed: int, length: int, depth: float, count, n_characters: int = 6, landmark_share: float = 0.0) -> Sample:
    """A story of about `length` tokens: every character has one event of each kind, one is asked about."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, 2 * n_characters)
    cast, friends = names[:n_characters], names[n_characters:]
    kind = rng.randrange(len(EVENTS))  # the asked event, about cast[0]
    facts = []
    for i, name in enumerate(cast):
        slots = {"name": name, "place": rng.choice(PLACES), "color": rng.choice(COLORS), "obj": rng.choice(OBJECTS),
                 "friend": friends[i]}
        slots["thing"] = f"{slots['color']} {slots['obj']}"
        for j, (event, query, field) in enumerate(EVENTS):
            if i == 0 and j == kind:
                facts.append((depth, event.format(**slots)))
                question, answer = query.format(**slots), slots[field]
            else:
                facts.append((rng.random(), event.format(**slots)))
    context = haystack(rng, length, count, facts, landmark_share)
    return Sample("narrative", context, question, answer, length, depth)


def normalize_answer(s: str) -> str:
    """LongBench/SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between normalised prediction and reference (LongBench qa_f1_score)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
