"""Real English prose that every machine with Python has offline: the standard library's own text.

Three sources, each cut into documents: the language reference that CPython ships as prose (pydoc_data.topics, one
document per topic), and the docstrings and comment blocks of each top-level standard-library package (one document
per package: `email`, `asyncio`, ...). A paragraph is kept when it reads as prose (mostly words, few code symbols,
ends like a sentence).

Documents, never sentences, are split between training and evaluation: a document is in the evaluation split when
the hash of its name falls in the lowest EVAL_SHARE (30 % of the documents, about 17 % of the words), so the
held-out prose family (prose_family.py) is text of packages and topics that no training stage reads.
"""
import functools
import hashlib
import random
import re
import sysconfig
from pathlib import Path
from typing import Iterator

import pydoc_data.topics

EVAL_SHARE = 0.3
SPLITS = ("train", "eval")
MIN_WORDS = 12  # shorter paragraphs are mostly headings and fragments
MAX_SENTENCE_WORDS = 40  # filler leaves out the longer sentences (2 %), so a context fills to within one sentence
CODE_CHARS = set("=_[]{}<>*`|\\#@$%^~")

TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def is_prose(paragraph: str) -> bool:
    """Mostly plain words (> 80 %), almost no code symbols (< 1 % of characters), ends like a sentence."""
    words = paragraph.split()
    if len(words) < MIN_WORDS or ">>>" in paragraph or paragraph[-1] not in ".!?":
        return False
    plain = sum(w.strip(".,;:()\"'!?").isalpha() for w in words)
    symbols = sum(c in CODE_CHARS for c in paragraph)
    return plain > 0.8 * len(words) and symbols < 0.01 * len(paragraph)


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a text whose paragraphs are separated by blank lines, each on one line."""
    joined = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [p for p in joined if is_prose(p)]


def comment_blocks(source: str) -> list[str]:
    """Runs of consecutive `#` comment lines of a Python file, each as one text."""
    blocks, block = [], []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            block.append(s.lstrip("#").strip())
        elif block:
            blocks.append(" ".join(block))
            block = []
    return blocks


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def documents() -> dict[str, list[str]]:
    """Document name -> its prose paragraphs, in a fixed order: `topic:<name>` for the language reference, the
    top-level package (or module) name for docstrings and comments."""
    docs = {f"topic:{name}": paragraphs(text) for name, text in sorted(pydoc_data.topics.topics.items())}
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "__pycache__" in parts:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        texts = [a or b for a, b in TRIPLE_QUOTED.findall(source)] + comment_blocks(source)
        docs.setdefault(parts[0].removesuffix(".py"), []).extend(p for t in texts for p in paragraphs(t))
    return {name: paras for name, paras in docs.items() if paras}


def split_of(name: str) -> str:
    """'eval' for a document whose name hashes into the lowest EVAL_SHARE, else 'train' (stable across runs)."""
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < EVAL_SHARE else "train"


@functools.cache
def split(which: str) -> list[list[str]]:
    """The documents (paragraph lists) of one split. The standard library repeats some text across documents (the
    language reference's shared paragraphs, licence boilerplate): an evaluation paragraph with a sentence that the
    training split also has is dropped."""
    if which not in SPLITS:
        raise ValueError(f"prose split {which!r}: expected one of {SPLITS}")
    docs = [paras for name, paras in documents().items() if split_of(name) == which]
    if which == "eval":
        seen = {s for doc in split("train") for p in doc for s in sentences(p)}
        docs = [kept for doc in docs if (kept := [p for p in doc if seen.isdisjoint(sentences(p))])]
    return docs


def sentences(paragraph: str) -> list[str]:
    return SENTENCE_END.split(paragraph)


def filler(rng: random.Random, which: str) -> Iterator[str]:
    """Endless prose, sentence by sentence (those up to MAX_SENTENCE_WORDS): consecutive paragraphs of a random
    document from a random paragraph on, then another document."""
    docs = split(which)
    while True:
        doc = rng.choice(docs)
        for paragraph in doc[rng.randrange(len(doc)):]:
            yield from (s for s in sentences(paragraph) if len(s.split()) <= MAX_SENTENCE_WORDS)


def passage(rng: random.Random, which: str, n_tokens: int, count) -> str:
    """About n_tokens tokens of consecutive prose (count(text) -> tokens)."""
    out, used = [], 0
    for s in filler(rng, which):
        used += count(s)
        if used > n_tokens and out:
            break
        out.append(s)
    return " ".join(out)
