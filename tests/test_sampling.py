"""Sampling: greedy, temperature, top-p against a naive reference, and seeded reproducibility."""
import pytest
import torch

from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, generate, nucleus, sample
from tinytis.model import Transformer


def naive_nucleus(probs: list[float], top_p: float) -> list[float]:
    """Walk the tokens from most to least likely, keeping each until the kept mass reaches top_p."""
    kept, mass = [0.0] * len(probs), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept[i] = probs[i]
        mass += probs[i]
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_nucleus_matches_naive_reference(top_p):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(16, 40, generator=g, dtype=torch.float64) * 2, dim=-1)
    got = nucleus(probs, top_p)
    for row, expected in zip(got.tolist(), probs.tolist()):
        assert row == naive_nucleus(expected, top_p)


def test_greedy_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0), torch.Generator()), logits.argmax(-1))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (0.8, 0.7)])
def test_sample_frequencies_follow_the_distribution(temperature, top_p):
    """Draw many tokens at once from one row of logits: each token's frequency is within 5 sigma of its probability."""
    logits = torch.randn(12, generator=torch.Generator().manual_seed(2)) * 1.5
    probs = torch.softmax(logits.double() / temperature, dim=-1).tolist()
    kept = naive_nucleus(probs, top_p)
    expected = torch.tensor(kept) / sum(kept)
    n = 40_000
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=temperature, top_p=top_p), torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=12).double() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)
    assert (freq[expected == 0] == 0).all()


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=300, max_seq_len=256)
    m = Transformer(args)
    m.init_weights(seed=0, std=0.3)
    return m.eval()


def test_seeded_sampling_is_reproducible(model):
    prompts = [[1, 5, 9, 200], [1, 7]]
    run = lambda seed: generate(model, prompts, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=seed)).tokens
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0) != generate(model, prompts, SamplingParams(max_new_tokens=24)).tokens  # not greedy in disguise
