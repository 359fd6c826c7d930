"""The standard library's prose: what counts as prose, the split by document, and that no training draw reads the
evaluation split (which the real-prose family is built on)."""
import random

import pytest

from tinytis.tasks import prose, prose_family, tis_mix, training
from tinytis.tasks.niah import MULTIKEY_FACT, PASSKEY_NEEDLE
from tinytis.tasks.style import TRAIN_TEMPLATES

COUNT = lambda s: len(s.split())  # a stand-in tokenizer: the builders only need a count per text


class WordTokenizer:
    """The copy and language tasks take a tokenizer: one id per distinct word, BOS 1, EOS 2."""

    bos_id, eos_id, vocab_size = 1, 2, 50_000

    class sp:
        unk_id = staticmethod(lambda: 0)

    def __init__(self):
        self.ids = {}

    def encode(self, s, bos=True, eos=False):
        ids = [self.ids.setdefault(w, 3 + len(self.ids)) for w in s.split()]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        words = {i: w for w, i in self.ids.items()}
        return " ".join(words[i] for i in ids if i in words)


@pytest.mark.parametrize("text, expected", [
    ("The result is then bound to the class name, and the name refers to the class from then on.", True),
    ("x = foo(bar[1], baz={'a': 2}) if a_b_c else None; return x_y_z and q_r_s or t_u_v here.", False),
    ("Too short to be a paragraph.", False),
    ("This paragraph has enough words in it but it never ends like a sentence would end so", False),
    (">>> print(1) and then a long line of words that would otherwise look like prose to us.", False),
])
def test_is_prose(text, expected):
    assert prose.is_prose(text) is expected


def test_paragraphs_join_wrapped_lines_and_drop_code():
    text = ("The following methods can be defined to customize the meaning\nof attribute access for class "
            "instances of the language.\n\n   object.__getattr__(self, name)\n\nShort line.\n")
    assert prose.paragraphs(text) == ["The following methods can be defined to customize the meaning of attribute "
                                      "access for class instances of the language."]


def test_comment_blocks():
    source = "#!/usr/bin/env python\n# first line\n#   second line\nx = 1\n    # another\n"
    assert prose.comment_blocks(source) == ["first line second line", "another"]


def test_split_by_document_and_disjoint():
    names = list(prose.documents())
    assert {prose.split_of(n) for n in names} == set(prose.SPLITS)
    assert all(prose.split_of(n) == prose.split_of(n) for n in names)
    train, held = prose.split("train"), prose.split("eval")
    words = [sum(len(p.split()) for doc in docs for p in doc) for docs in (train, held)]
    assert words[0] > 100_000 and words[1] > 20_000  # enough of each for training and for the family's filler
    train_sentences = {s for doc in train for p in doc for s in prose.sentences(p)}
    assert not any(s in train_sentences for doc in held for p in doc for s in prose.sentences(p))


@pytest.fixture(scope="module")
def eval_sentences():
    return {s for doc in prose.split("eval") for p in doc for s in prose.sentences(p) if len(s.split()) >= 5}


def test_no_training_draw_reads_the_evaluation_split(eval_sentences):
    rng, tok = random.Random(0), WordTokenizer()
    texts = [training.sample(rng, rng.randint(64, 1024), COUNT, {"prose": 1}).context for _ in range(150)]
    texts += [tis_mix.sample(rng, rng.randint(64, 1024), COUNT).context for _ in range(300)]
    texts += [tok.decode(training.copy(rng, 512, tok, in_prose=True)[0]) for _ in range(50)]
    texts += [tok.decode(training.language(rng, 512, tok)[0]) for _ in range(50)]
    drawn = " ".join(texts)
    assert len(drawn.split()) > 50_000
    assert not [s for s in eval_sentences if s in drawn]


def test_real_prose_family_states_the_evaluation_facts_in_evaluation_prose(eval_sentences):
    s = prose_family.FAMILY.niah("passkey", 7, 600, 0.5, COUNT)
    assert PASSKEY_NEEDLE.format(k=s.answer) in s.context
    assert sum(sentence in s.context for sentence in eval_sentences) >= 5
    m = prose_family.FAMILY.niah("multikey", 7, 600, 0.5, COUNT)
    name = m.question.removeprefix("What is the secret code of ").split("?")[0]
    assert MULTIKEY_FACT.format(name=name, code=m.answer) in m.context
    assert s.context == prose_family.FAMILY.niah("passkey", 7, 600, 0.5, COUNT).context  # a function of the seed


def test_training_states_facts_in_several_shapes():
    rng = random.Random(3)
    needles = set()
    for _ in range(200):
        s = training.in_prose(rng, 256, rng.random(), COUNT)
        if s.question.startswith("What is the pass key?"):
            needles |= {t for t in TRAIN_TEMPLATES.passkey if t.format(k=s.answer) in s.context}
    assert needles == set(TRAIN_TEMPLATES.passkey)
