"""bench.py peers' harness (tinytis/bench/peers.py) on the transformers side: the full cache answers and scores the continuation as tinytis's
engine does, and a pressed cache fed several tokens per forward equals feeding them one at a time (the oracle of
kvpress's pipeline), including when a press leaves the layers different lengths (PyramidKV)."""
import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinytis.bench.common import random_checkpoint  # noqa: E402
from tinytis.bench.peers import PressedCache, press_answer, press_continuation_logits, press_rows  # noqa: E402
from tinytis.config import ModelArgs  # noqa: E402
from tinytis.engine import SamplingParams, generate  # noqa: E402
from tinytis.evaluate import Evaluator  # noqa: E402
from tinytis.grid import cells, make_samples  # noqa: E402
from tinytis.model import Transformer  # noqa: E402
from tinytis.tokenizer import Tokenizer  # noqa: E402
from random_model import random_prompts  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny"
ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=256, max_seq_len=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = random_checkpoint(ARGS, tmp_path_factory.mktemp("peer"), seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    return hf, Transformer.from_pretrained(path).eval()


def keep_newest(per_layer: list[int]):
    """A press in kvpress's form (press(model) is a context manager): layer i keeps its per_layer[i] newest tokens."""

    @contextlib.contextmanager
    def press(model):
        def hook(i):
            def truncate(module, args, kwargs, output):
                cache = kwargs["past_key_values"] if "past_key_values" in kwargs else kwargs["cache"]  # renamed in 5.x
                layer = cache.layers[i]
                layer.keys, layer.values = layer.keys[..., -per_layer[i]:, :], layer.values[..., -per_layer[i]:, :]
            return truncate

        handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True)
                   for i, layer in enumerate(model.model.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    return press


def test_full_cache_answers_and_continuation_logits_equal_tinytis(models):
    hf, ours = models
    context, cont = random_prompts(ARGS, [100, 12], seed=5)
    expected = ours(torch.tensor([context + cont]))[0, len(context) : -1]  # the positions that predict cont[1:]
    got = press_continuation_logits(PressedCache(hf, None, context), cont)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_new_tokens=8)  # greedy
    assert press_answer(PressedCache(hf, None, context), cont, eos_id=-1, max_new_tokens=8) == \
        generate(ours, [context + cont], params).tokens[0]


@pytest.mark.parametrize("per_layer", [[20, 20, 20], [8, 24, 16]], ids=["equal layers", "per-layer budgets"])
def test_pressed_cache_feeds_like_one_token_at_a_time(models, per_layer):
    hf, _ = models
    context, cont = random_prompts(ARGS, [80, 10], seed=6)
    cache = PressedCache(hf, keep_newest(per_layer), context)
    assert [layer.keys.shape[-2] for layer in cache.cache.layers] == per_layer
    assert cache.bytes_held == 2 * sum(per_layer) * ARGS.n_kv_heads * ARGS.head_dim * 4
    reference = copy.deepcopy(cache.cache)
    with torch.inference_mode():
        expected = torch.stack([hf(input_ids=torch.tensor([[t]]), past_key_values=reference,
                                   position_ids=torch.tensor([[len(context) + i]])).logits[0, -1]
                                for i, t in enumerate(cont[:-1])])
    torch.testing.assert_close(press_continuation_logits(cache, cont), expected, atol=1e-5, rtol=1e-5)


def test_press_rows_score_the_full_cache_as_tinytis_does_on_the_embedded_model():
    """bench.py peers' rows without a press: transformers' full cache answers each cell's samples, scored as the
    evaluator scores tinytis's full cache on the same samples (same greedy answers, so the same scores)."""
    model, tok = Transformer.from_pretrained(TINY), Tokenizer.from_dir(TINY)
    evaluator = Evaluator(model, tok, TINY)
    grid_cells = cells("niah", [160], [0.5], []) + cells("narrative", [160], [0.5], [])
    count = lambda s: len(tok.encode(s, bos=False))  # noqa: E731
    samples = {c: make_samples(c, 2, 0, count) for c in grid_cells}
    theirs = press_rows(None, TINY, evaluator, grid_cells, samples, [], [0.1])
    ours = evaluator.run(["niah", "narrative"], ["full"], [0.1], ["agnostic"], [160], [0.5], [], 2)
    score = lambda rows: {(r.task, r.variant, r.metric): (r.n, r.score) for r in rows}  # noqa: E731
    assert {r.policy for r in theirs} == {"transformers"} and len(theirs) == len(ours) == 5  # 3 NIAH variants; F1, EM
    assert score(theirs) == score(ours)
