"""CacheManager: budgets and what they cost in bytes, chunked prefill's peak, schedules, head-adaptive
allocation, decode-time eviction, forks, and one-line errors for bad input."""
import math

import pytest
import torch

from tinytis.cache import PagedKVCache, PagePool
from random_model import random_model, random_prompts
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, answer, decode, prefill
from tinytis.errors import UserError
from tinytis.manager import CacheManager, ManagerConfig, top_k
from tinytis.model import Transformer
from tinytis.importance import TIS
from tinytis.policies import Policy, TISPolicy, make_policy

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=101, rope_theta=1e4)
PAGE = 16


def tiny_model(seed=0):
    return random_model(ARGS, seed)


def prompts(lengths, seed=0):
    return random_prompts(ARGS, lengths, seed)


def manager(policy="snapkv", budget=0.5, **config):
    return CacheManager(ARGS, make_policy(policy), ManagerConfig(budget, n_sink=4, n_recent=8, **config))


TOKEN_BYTES = 2 * ARGS.n_layers * ARGS.n_kv_heads * ARGS.head_dim * 4  # fp32 K and V of one token, every layer and head
PAGE_BYTES = 2 * PAGE * ARGS.head_dim * 4


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "knorm", "streaming", "random"])
@pytest.mark.parametrize("b", [0.15, 0.25, 0.5, 0.75, 60])
def test_bytes_held_after_eviction_within_budget_plus_a_page_per_head(policy, b):
    contexts = prompts([150, 123, 97])
    state = prefill(tiny_model(), contexts, manager(policy, b))
    full = sum(map(len, contexts)) * TOKEN_BYTES
    allowed = sum(b * n if isinstance(b, float) else b for n in map(len, contexts)) * TOKEN_BYTES
    heads = len(contexts) * ARGS.n_layers * ARGS.n_kv_heads
    assert state.stats["kv_bytes_full"] == full
    assert state.stats["kv_bytes_held"] == state.cache.pages_held() * PAGE_BYTES == state.cache.pool.used * PAGE_BYTES
    assert state.stats["kv_bytes_held"] <= allowed + heads * PAGE_BYTES
    for l, per_head in enumerate(state.stats["tokens_held"]):
        for h, n in enumerate(per_head):
            assert n == sum(round(b * len(c)) if isinstance(b, float) else b for c in contexts)


@pytest.mark.parametrize("budget,chunk", [(32, 32), (30, 20), (24, 40)])
def test_chunked_prefill_peak_bytes(budget, chunk):
    """A prompt 16x longer than the budget: the pool never holds more than budget + chunk + a page per head."""
    contexts = prompts([16 * budget, 16 * budget - 37])
    state = prefill(tiny_model(), contexts, manager("snapkv", budget, prefill_chunk=chunk))
    pool = state.cache.pool
    heads = len(contexts) * ARGS.n_layers * ARGS.n_kv_heads
    peak = pool.peak_used * pool.page_bytes
    assert peak <= len(contexts) * (budget + chunk + PAGE) * TOKEN_BYTES
    assert peak <= heads * math.ceil((budget + chunk) / PAGE) * PAGE_BYTES
    assert state.stats["tokens_held"] == [[len(contexts) * budget] * ARGS.n_kv_heads] * ARGS.n_layers
    one_shot = prefill(tiny_model(), contexts, manager("snapkv", budget))
    assert one_shot.cache.pool.peak_used > 4 * pool.peak_used  # what chunking saves


def test_pyramid_budgets_decrease_with_depth_and_keep_the_total():
    m = CacheManager(ModelArgs(dim=8, n_layers=5, n_heads=2, n_kv_heads=1, head_dim=4, hidden_dim=8, vocab_size=8),
                     make_policy("snapkv"), ManagerConfig(100, n_sink=4, n_recent=8, schedule="pyramid"))
    m.start(PagedKVCache(m.args, 2, PagePool(4)), [400, 150])
    # PyramidKV: linear from 2k - lo at the bottom to lo = max(k / beta, anchors) at the top; here lo = 12
    assert m.budget[:, 0].tolist() == [188, 144, 100, 56, 12]
    assert m.budget[:, 1].tolist() == [150, 144, 100, 56, 12]  # a layer never keeps more than the prompt


def test_head_adaptive_top_k_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    L, B, KV, S = 2, 3, 4, 9
    scores = torch.randn(L, B, KV, S, generator=g, dtype=torch.float64)
    scores[0, 0, 1, 3:] = -math.inf  # a head holding fewer slots
    k = torch.randint(1, S, (L, B), generator=g)
    keep = top_k(scores, k, per_layer=True)
    for l in range(L):
        for b in range(B):
            items = sorted(((h, s) for h in range(KV) for s in range(S)), key=lambda i: (-scores[l, b, i[0], i[1]].item(), i))
            chosen = set(items[: int(k[l, b]) * KV])
            assert {(h, s) for h in range(KV) for s in range(S) if keep[l, b, h, s]} == chosen
    per_head = top_k(scores, k, per_layer=False)
    assert (per_head.sum(-1) == k[..., None]).all()


def test_head_adaptive_heads_hold_different_counts_within_the_layer_budget():
    state = prefill(tiny_model(), prompts([120, 88]), manager("snapkv", 0.5, head_adaptive=True))
    held = state.cache.length  # (L, B, KV)
    assert (held.sum(-1) == torch.tensor([[60 * 2, 44 * 2]] * ARGS.n_layers)).all()
    assert (held[..., 0] != held[..., 1]).any()


@pytest.mark.parametrize("policy", ["tova", "h2o", "streaming"])
def test_decode_time_eviction_holds_budget_plus_buffer(policy):
    contexts = prompts([64, 50])
    model = tiny_model()
    m = manager(policy, 1.0, decode_budget=40, decode_buffer=5)
    state = prefill(model, contexts, m)
    lengths = []
    after_step = m.after_step

    def watch(cache, ids, positions, hidden):
        after_step(cache, ids, positions, hidden)
        lengths.append(cache.length.clone())

    m.after_step = watch
    gen = decode(model, state, prompts([7, 3], seed=1), SamplingParams(max_new_tokens=30))
    assert len(lengths) == 30 and len(gen.tokens[0]) == 30
    assert all((n <= 40 + 5).all() for n in lengths)
    assert (lengths[0] == 40).all()  # the question pushed every head past the buffer: back to the decode budget
    assert any((n == 45).all() for n in lengths)  # then it grows to budget + buffer before the next eviction


def test_fork_answers_several_questions_from_one_compressed_context():
    model = tiny_model()
    context = prompts([100])
    questions = prompts([6, 9, 4], seed=5)
    params = SamplingParams(max_new_tokens=8)
    state = prefill(model, context, manager("knorm", 0.5))
    held = state.cache.pages_held()
    answers = []
    for q in questions:
        fork = state.fork()
        answers.append(decode(model, fork, [q], params).tokens[0])
        fork.free()
        assert state.cache.pool.used == held  # the fork's pages went back
    for q, got in zip(questions, answers):
        assert answer(model, context, [q], params, "knorm", 0.5, n_sink=4, n_recent=8).tokens[0] == got


@pytest.mark.parametrize("budget", [2, 5, 9])
def test_budget_below_the_anchors_keeps_the_sinks_then_the_newest(budget):
    """With a share of 1 the anchors may fill the budget (the rule before the share, kept for older TIS files)."""
    state = prefill(tiny_model(), prompts([80]), manager("random", budget, anchor_share=1.0))  # 4 sinks, 8 recent
    sinks = min(4, budget)
    kept = set(range(sinks)) | set(range(80 - (budget - sinks), 80))
    for l in range(ARGS.n_layers):
        for h in range(ARGS.n_kv_heads):
            assert set(state.cache.pos[l, 0, h, : state.cache.length[l, 0, h]].tolist()) == kept


class Middle(Policy):
    """Prefers the tokens nearest the middle of a 512-token context."""

    def score(self, ctx):
        return -(ctx.positions - 255.5).abs().double()


def small_budget_kept(policy):
    """Positions each head keeps from a 512-token context at 5 % (26 tokens) with the default anchors."""
    state = prefill(tiny_model(), prompts([512]), CacheManager(ARGS, policy, ManagerConfig(0.05)))
    return [set(state.cache.pos[l, 0, h, : state.cache.length[l, 0, h]].tolist())
            for l in range(ARGS.n_layers) for h in range(ARGS.n_kv_heads)]


def test_small_budget_anchors_take_a_quarter_and_leave_the_rest_to_content():
    """26 slots: the anchors get floor(26 / 4) = 6 (4 sinks, 2 newest), the policy's 20 best fill the rest."""
    content = set(range(246, 266))  # the 20 positions nearest 255.5
    for kept in small_budget_kept(Middle()):
        assert kept == {0, 1, 2, 3, 510, 511} | content


class Recording(Policy):
    """Another policy, its scores remembered."""

    def __init__(self, inner):
        self.inner, self.needs, self.anchors, self.scores = inner, inner.needs, inner.anchors, []

    def score(self, ctx):
        self.scores.append((ctx.positions.clone(), self.inner.score(ctx).double().clone()))
        return self.scores[-1][1]


@pytest.mark.parametrize("policy", ["random", "knorm", "tova", "h2o", "snapkv", "streaming", "tis"])
def test_small_budget_keeps_content_beyond_the_anchors(policy):
    """Every policy with anchors (tis with components that record 4 + 16) keeps, at 26 slots, the 4 sinks, the
    2 newest and the 20 tokens it scores best of the others (its own +inf first, ties to the earlier position)."""
    if policy == "tis":
        policy = TISPolicy(TIS(ARGS, meta={"anchors": {"n_sink": 4, "n_recent": 16}}))
    else:
        policy = make_policy(policy)
    recording = Recording(policy)
    kept = small_budget_kept(recording)
    (positions, scores), = recording.scores
    fmax = torch.finfo(torch.float64).max
    for i, got in enumerate(kept):
        l, h = divmod(i, ARGS.n_kv_heads)
        ranked = sorted((p for p in positions[l, h].tolist() if 4 <= p < 510),
                        key=lambda p: (-min(scores[l, h, p].item(), fmax), p))
        assert got == {0, 1, 2, 3, 510, 511} | set(ranked[:20]), (l, h)


@pytest.mark.parametrize("call,message", [
    (lambda m, c: answer(m, c, None, SamplingParams(), "nope", 0.5), "unknown policy"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 0), "budget 0"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 0.0), "budget 0.0"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 1.5), "budget 1.5"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 500), "more than the 80-token prompt"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 0.5, prefill_chunk=0), "prefill chunk"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 0.5, prefill_chunk=-3), "prefill chunk"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "oracle", 0.5), "reference answer"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "oracle", 0.5, references=[[]]), "reference answer"),
    (lambda m, c: answer(m, c, None, SamplingParams(), "snapkv", 0.5, schedule="zigzag"), "schedule"),
    (lambda m, c: answer(m, c, [[]], SamplingParams(), "snapkv", 0.5), "question"),
])
def test_bad_input_is_a_one_line_user_error(call, message):
    with pytest.raises(UserError) as e:
        call(tiny_model(), prompts([80]))
    assert message in str(e.value) and "\n" not in str(e.value)


# -- generate.py --------------------------------------------------------------------------------------------------

CLI_ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32768)
DOCUMENT = "The pass key is 4172. Remember it. " + "The grass is green. The sky is blue. " * 8


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    import shutil
    from pathlib import Path

    from tinytis.weights import save_hf

    mistral_common = pytest.importorskip("mistral_common")
    path = tmp_path_factory.mktemp("model")
    model = Transformer(CLI_ARGS)
    model.init_weights(seed=0, std=0.3)
    save_hf(model.state_dict(), path, CLI_ARGS)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3", path / "tokenizer.model")
    (path / "doc.txt").write_text(DOCUMENT)
    return path


def generate_py(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(root / "generate.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_answers_each_question_from_the_compressed_prompt(cli_model):
    from tinytis.tokenizer import Tokenizer

    questions = ["What is the pass key?", "What colour is the sky?"]
    r = generate_py("--model", cli_model, "--prompt-file", cli_model / "doc.txt", "--budget", 0.5, "--policy", "knorm",
                    "--max-new-tokens", 6, "--question", questions[0], "--question", questions[1])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 6
    tok = Tokenizer.from_dir(cli_model)
    model = Transformer.from_pretrained(cli_model)
    ids = tok.encode(DOCUMENT)
    for i, question in enumerate(questions):
        q = tok.encode(question, bos=False)
        gen = answer(model, [ids], [q], SamplingParams(max_new_tokens=6), "knorm", 0.5, tok.eos_id)
        expected = tok.decode(ids + q + gen.tokens[0])[len(tok.decode(ids + q)):]
        assert lines[3 * i] == f"Q: {question}"
        assert lines[3 * i + 1] == expected
        kept = round(0.5 * len(ids))
        assert f"after eviction (knorm, budget 0.5): {kept} of {len(ids)} tokens per head" in lines[3 * i + 2]


@pytest.mark.parametrize("flags,word", [
    (("--policy", "nope"), "unknown policy"),
    (("--budget", "5000"), "more than the"),
    (("--prefill-chunk", "0"), "--prefill-chunk"),
    (("--policy", "oracle"), "reference answer"),
])
def test_cli_bad_input_is_one_line_exit_2(cli_model, flags, word):
    r = generate_py("--model", cli_model, "--prompt-file", cli_model / "doc.txt", *flags)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr and r.stdout == ""
