"""The held view (tinytis.cache.view.HeldKV), which decode steps append to, against what it replaces: gathering
every held K/V row from the pages on every forward. Over runs with evictions in the middle of decoding, padded and
unpadded question chunks, heads of one layer holding different numbers of slots and a sliding window, the logits of
every step are bit-identical either way, and the view was really appended to. Also: Rope.apply is apply_rope, bit
for bit."""
from dataclasses import replace

import pytest
import torch

from random_model import random_model, random_prompts
from tinytis.cache.view import HeldKV
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, answer
from tinytis.model import Rope, apply_rope, rope_inv_freq

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=101, rope_theta=1e4)
DECODE_EVICTIONS = dict(decode_budget=0.3, decode_buffer=3)  # evict back to 30 % whenever a head holds 3 more

CASES = {  # name -> model args, policy, budget, manager options, question lengths
    "h2o": (ARGS, "h2o", 0.4, DECODE_EVICTIONS, [5, 5, 5]),  # mass recorded at every step; unpadded questions append
    "knorm-adaptive": (ARGS, "knorm", 0.4, dict(head_adaptive=True, schedule="pyramid", **DECODE_EVICTIONS), [5, 9, 3]),
    "full": (ARGS, "full", 1.0, {}, [5, 9, 3]),
    "window": (replace(ARGS, sliding_window=24), "tova", 0.5, DECODE_EVICTIONS, [4, 4, 4]),
    "h2o-bf16": (ARGS, "h2o", 0.4, DECODE_EVICTIONS, [5, 5, 5]),  # the view holds the bf16 pages upcast to fp32
}


def decode_logits(case, monkeypatch, gather: bool):
    """Every logits row of answer() on three contexts, and how often the view was appended to and rebuilt; gather:
    the view is never valid, so every forward that attends to the past rebuilds it from the pages."""
    args, policy, budget, options, question_lengths = CASES[case]
    calls = {"append": 0, "reset": 0}
    for name in calls:
        method = getattr(HeldKV, name)

        def counted(self, *a, name=name, method=method):
            calls[name] += 1
            return method(self, *a)

        monkeypatch.setattr(HeldKV, name, counted)
    if gather:
        monkeypatch.setattr(HeldKV, "valid", property(lambda self: False))
    model = random_model(args, seed=0)
    if case.endswith("bf16"):
        model = model.to(torch.bfloat16)
    seen, logits = [], model.logits
    model.logits = lambda h: seen.append(logits(h)) or seen[-1]
    answer(model, random_prompts(args, [90, 67, 75], seed=1), random_prompts(args, question_lengths, seed=2),
           SamplingParams(max_new_tokens=24), policy, budget, n_sink=4, n_recent=8, **options)
    monkeypatch.undo()
    return seen, calls


@pytest.mark.parametrize("case", list(CASES))
def test_decoding_through_the_view_equals_gathering_every_step(case, monkeypatch):
    viewed, calls = decode_logits(case, monkeypatch, gather=False)
    gathered, gather_calls = decode_logits(case, monkeypatch, gather=True)
    assert len(viewed) == len(gathered) == 25  # after the context, after the question, 23 decode steps
    for step, (a, b) in enumerate(zip(viewed, gathered)):
        assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max().item():.3g}"
    assert gather_calls["append"] == 0 and gather_calls["reset"] >= 23
    assert calls["append"] >= 15  # most decode steps appended
    if CASES[case][3]:
        assert calls["reset"] >= 5  # evictions in the middle of decoding: rebuilt after each


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_apply_is_apply_rope_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[-1, 0, 1, 2, 7, 500], [3, 4, 5, 6, 7, 8]])
    rope = Rope(positions, rope_inv_freq(32, 1e4), dtype)
    x = torch.randn(2, 3, 6, 32, generator=g).to(dtype) * 10
    assert torch.equal(rope.apply(x), apply_rope(x, rope.cos, rope.sin))
