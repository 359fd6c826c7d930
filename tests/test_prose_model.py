"""The prose-reading base model (models/tiny-v3, `python train.py base --out models/tiny-v3`): its tokenizer on held-out
prose, transformers as the oracle for its logits and token ids, and what it must do with text it was not trained on:
the real-prose example answers from its full cache and from 10 % of it, and it copies from mid-context."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytis.model import Transformer
from tinytis.tasks import prose, prose_family
from tinytis.tokenizer import Tokenizer
from tinytis.train.base import induction_accuracy

ROOT = Path(__file__).resolve().parents[1]
V3 = ROOT / "models" / "tiny-v3"
EXAMPLE = ROOT / "examples" / "lighthouse.txt"  # ~930 words of prose written for the example, a passkey inside
QUESTION = "What is the pass key? The pass key is"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(V3)


def test_tokenizer_splits_held_out_prose_into_at_most_1_6_pieces_per_word(tok):
    words = pieces = 0
    for doc in prose.split("eval"):
        for p in doc:
            words += len(p.split())
            pieces += len(tok.encode(p, bos=False))
    assert words > 20_000 and pieces / words <= 1.6
    assert tok.decode(tok.encode("naïve café, 12345 and \u2603", bos=False)) == "naïve café, 12345 and \u2603"  # bytes


def test_transformers_loads_it_to_the_same_logits_and_ids(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(V3, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(V3)
    sample = prose_family.FAMILY.niah("multikey", 10**9, 300, 0.5, lambda s: len(tok.encode(s, bos=False)))
    for text in (sample.context, sample.question, EXAMPLE.read_text()[:2000]):
        assert hf_tok(text)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(sample.context + " " + sample.question)])
    with torch.no_grad():
        assert (Transformer.from_pretrained(V3)(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("budget, policy", [("1.0", "full"), ("0.1", "snapkv")])
def test_the_real_prose_example_answers(budget, policy):
    r = subprocess.run([sys.executable, "generate.py", "--model", V3, "--prompt-file", EXAMPLE, "--question", QUESTION,
                        "--budget", budget, "--policy", policy, "--max-new-tokens", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    answer = r.stdout.split(f"Q: {QUESTION}\n")[1].splitlines()[0]
    assert answer.split()[0].rstrip(".") == "58213"


@pytest.mark.parametrize("length, floor", [(256, 0.7), (1024, 0.5)])
def test_it_copies_a_random_id_span_from_mid_context(tok, length, floor):
    assert induction_accuracy(Transformer.from_pretrained(V3), tok, length, n=32) >= floor
