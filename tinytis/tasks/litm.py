"""Lost in the middle: k short documents, exactly one holds the asked fact; accuracy by its position."""
import random

from tinytis.tasks import Sample
from tinytis.tasks.text import NAMES, OBJECTS, PLACES, grammar_sentence

DOC_FACT = "{name} keeps the {obj} in the {place}."
QUERY = "Where does {name} keep the {obj}? {name} keeps the {obj} in the"
TOKENS_PER_DOC = 45  # about how long one document is; sets how many fit a length


def docs_for(length: int) -> int:
    """How many documents make about `length` tokens (2 .. one per name)."""
    return max(2, min(len(NAMES), length // TOKENS_PER_DOC))


def make(seed: int, n_docs: int, gold: int, sentences_per_doc: int = 3) -> Sample:
    """n_docs documents; document `gold` (0-based) answers the question, the others state other people's facts."""
    rng = random.Random(seed)
    facts = [(name, rng.choice(OBJECTS), rng.choice(PLACES)) for name in rng.sample(NAMES, n_docs)]
    docs = []
    for i, (name, obj, place) in enumerate(facts):
        body = [grammar_sentence(rng) for _ in range(sentences_per_doc)]
        body.insert(rng.randrange(sentences_per_doc + 1), DOC_FACT.format(name=name, obj=obj, place=place))
        docs.append(f"Document {i + 1}: " + " ".join(body))
    name, obj, place = facts[gold]
    depth = gold / max(n_docs - 1, 1)
    return Sample("litm", " ".join(docs), QUERY.format(name=name, obj=obj), place, n_docs, depth)
