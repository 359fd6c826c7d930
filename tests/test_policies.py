"""Each policy's kept set equals a naive reference written from the method's definition (REFERENCE.md).

Random queries, keys and values (fp64, several shapes, GQA) go through a PagedKVCache, the manager evicts with the
policy, and the positions each (layer, KV head) keeps must be exactly those the reference picks: its scores
computed from q and k with plain numpy loops, anchors first, then by score, ties to the earlier position.
"""
import math

import numpy as np
import pytest
import torch

from tinytis.anchors import Anchors
from tinytis.cache import PagedKVCache, PagePool
from tinytis.config import ModelArgs
from tinytis.engine import left_pad
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.policies import POLICIES, Needs, Policy, ScoreContext, make_policy

N_SINK, N_RECENT = 2, 3
FMAX = np.finfo(np.float64).max

# (n_heads, n_kv_heads, context lengths, head_dim)
SHAPES = [(4, 2, [90, 67], 8), (4, 1, [64, 64], 8), (3, 3, [80, 51], 4), (8, 2, [100], 16)]


def run(policy, shape, budget, seed=0, reference_lengths=None, **config):
    """One prefill of random q, k, v through a paged cache, then eviction. Returns the inputs and, per
    (layer, row, KV head), the kept positions."""
    H, KV, lengths, D = shape
    args = ModelArgs(dim=16, n_layers=2, n_heads=H, n_kv_heads=KV, head_dim=D, hidden_dim=32, vocab_size=50)
    seqs = [n + (reference_lengths[b] if reference_lengths else 0) for b, n in enumerate(lengths)]
    g = torch.Generator().manual_seed(seed)
    ids, positions = left_pad([torch.randint(0, 50, (n,), generator=g).tolist() for n in seqs])
    B, T = ids.shape
    q = torch.randn(args.n_layers, B, H, T, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(args.n_layers, B, KV, T, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(args.n_layers, B, KV, T, D, generator=g, dtype=torch.float64)
    cache = PagedKVCache(args, B, PagePool(D, 16, 4, torch.float64))
    manager = CacheManager(args, policy, ManagerConfig(budget, n_sink=N_SINK, n_recent=N_RECENT, **config))
    manager.start(cache, lengths, reference_lengths)
    cache.begin_forward(positions)
    for layer in range(args.n_layers):
        cache.attend(layer, q[layer], k[layer], v[layer])
    manager.after_chunk(cache, ids, positions, torch.randn(B, T, args.dim, generator=g))
    manager.after_prefill(cache)
    kept = {}
    for l in range(args.n_layers):
        for b in range(B):
            for h in range(KV):
                kept[l, b, h] = set(cache.pos[l, b, h, : cache.length[l, b, h]].tolist())
    return args, q, k, seqs, kept


def probs(q, k, l, b, qh, kv, n):
    """Causal attention probabilities of the n real tokens of row b: P[i, j] for query i, key j (numpy)."""
    T = q.shape[3]
    Q = q[l, b, qh, T - n :].numpy()
    K = k[l, b, kv, T - n :].numpy()
    P = np.zeros((n, n))
    for i in range(n):
        logits = np.array([Q[i] @ K[j] / math.sqrt(Q.shape[1]) for j in range(i + 1)])
        e = np.exp(logits - logits.max())
        P[i, : i + 1] = e / e.sum()
    return P


def select(scores, n, k):
    """The k positions kept out of 0..n-1: anchors first (sinks, then the newest, at most a quarter of k), then by
    score (a policy's +inf below anchors), ties to the earlier position."""
    sinks = min(N_SINK, k // 4)
    recent = min(N_RECENT, k // 4 - sinks)
    anchor = lambda j: j < sinks or j > n - 1 - recent
    order = sorted(range(n), key=lambda j: (not anchor(j), -min(scores[j], FMAX), j))
    return set(order[:k])


def naive_scores(name, args, q, k, l, b, h, n, seq_len, budget):
    G = args.n_heads // args.n_kv_heads
    heads = range(h * G, (h + 1) * G)
    if name == "h2o":
        mass = np.mean([probs(q, k, l, b, qh, h, n).sum(0) for qh in heads], axis=0)
        return [math.inf if j > n - 1 - budget // 2 else mass[j] for j in range(n)]
    if name == "tova":  # the paper: the latest query's attention, averaged over every query head of the layer
        return np.mean([probs(q, k, l, b, qh, qh // G, n)[n - 1] for qh in range(args.n_heads)], axis=0)
    if name == "snapkv":
        pooled = []
        for qh in heads:
            window = probs(q, k, l, b, qh, h, n)[n - 32 :].sum(0)  # summed over the window: same order as the mean
            pooled.append([window[max(0, j - 3) : j + 4].max() for j in range(n)])
        mean = np.mean(pooled, axis=0)
        return [math.inf if j > n - 1 - 32 else mean[j] for j in range(n)]
    if name == "knorm":
        T = k.shape[3]
        return [-np.linalg.norm(k[l, b, h, T - n + j].numpy()) for j in range(n)]
    if name == "streaming":
        return [math.inf if j < 4 else j for j in range(n)]
    if name == "oracle":  # attention of the reference answer's queries on the context, in one causal pass
        mass = np.mean([probs(q, k, l, b, qh, h, seq_len)[n:, :n].sum(0) for qh in heads], axis=0)
        return mass
    raise ValueError(name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}KV{s[1]}")
@pytest.mark.parametrize("budget", [0.5, 40])
@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "knorm", "streaming", "oracle"])
def test_kept_set_matches_naive_reference(name, shape, budget):
    refs = [5 + b for b in range(len(shape[2]))] if name == "oracle" else None
    args, q, k, seqs, kept = run(make_policy(name), shape, budget, reference_lengths=refs)
    for (l, b, h), got in kept.items():
        n = shape[2][b]
        kb = round(budget * n) if isinstance(budget, float) else budget
        scores = naive_scores(name, args, q, k, l, b, h, n, seqs[b], kb)
        assert got == select(scores, n, kb), (l, b, h)
        assert len(got) == kb


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}KV{s[1]}")
def test_tova_keeps_one_set_per_layer(shape):
    """Every KV head of a layer keeps the same tokens (TOVA scores a token once per layer)."""
    _, _, _, _, kept = run(make_policy("tova"), shape, 0.3)
    for (l, b, h), got in kept.items():
        assert got == kept[l, b, 0], (l, b, h)


def test_tova_averages_by_token_when_heads_hold_different_tokens():
    """After a head-adaptive eviction the heads of a layer hold different tokens: a token's score is the attention
    the layer's 4 query heads gave it, a head that no longer holds it counting 0."""
    positions = torch.tensor([[[0, 1, 2], [0, 2, -1]]])  # (L=1, KV=2, S=3)
    window = torch.arange(1.0, 13.0, dtype=torch.float64).view(1, 2, 3, 2)  # (L, KV, S, G=2)
    ctx = ScoreContext(positions, torch.tensor([2]), 2, torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]), window=window)
    token = {0: (1 + 2 + 7 + 8) / 4, 1: (3 + 4) / 4, 2: (5 + 6 + 9 + 10) / 4}
    scores = make_policy("tova").score(ctx)
    assert scores[0, 0].tolist() == [token[0], token[1], token[2]]
    assert scores[0, 1, :2].tolist() == [token[0], token[2]]


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"H{s[0]}KV{s[1]}")
def test_random_is_seeded_uniform(shape):
    args, q, k, seqs, kept = run(POLICIES["random"](seed=7), shape, 0.5)
    g = torch.Generator().manual_seed(7)
    for b, n in enumerate(shape[2]):
        draws = torch.rand((args.n_layers, args.n_kv_heads, n), generator=g)  # one draw per sequence, in order
        for l in range(args.n_layers):
            for h in range(args.n_kv_heads):
                assert kept[l, b, h] == select(draws[l, h].tolist(), n, round(0.5 * n))
    _, _, _, _, other = run(POLICIES["random"](seed=8), shape, 0.5)
    assert other != kept


def test_full_keeps_everything():
    shape = SHAPES[0]
    _, _, _, seqs, kept = run(make_policy("full"), shape, 0.5)
    for (l, b, h), got in kept.items():
        assert got == set(range(shape[2][b]))


class OldestFirst(Policy):
    """Prefers the oldest tokens and carries its own anchors, as a learned policy does from its training."""

    anchors = Anchors(1, 5, max_share=0.5)

    def score(self, ctx):
        return -ctx.positions.double()


def test_a_policy_with_its_own_anchors_is_evicted_with_them():
    """The manager's anchors here are 2 sinks and 3 recent within a quarter of the budget; the policy's 1 and 5
    within half of it win (a quarter of 20 would leave 4 recent)."""
    shape = SHAPES[0]
    _, _, _, _, kept = run(OldestFirst(), shape, 20)
    for (l, b, h), got in kept.items():
        n = shape[2][b]
        assert got == {0} | set(range(1, 15)) | set(range(n - 5, n)), (l, b, h)


class Recorder(Policy):
    """Keeps the newest tokens and remembers the contexts it was given."""

    needs = Needs(hidden=True)

    def __init__(self):
        self.contexts = []

    def score(self, ctx):
        self.contexts.append(ctx)
        return ctx.per_slot(ctx.token_pos.double())


def test_context_carries_ids_and_hidden_states_of_held_tokens():
    """What a learned policy (tis) reads: ids and final-layer hidden states of the tokens held, by position."""
    from tinytis.engine import answer, SamplingParams
    from tinytis.model import Transformer

    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=61, rope_theta=1e4)
    model = Transformer(args)
    model.init_weights(0, std=0.1)
    policy = Recorder()
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (60, 45)]
    answer(model, contexts, None, SamplingParams(max_new_tokens=6), policy, 24, n_sink=2, n_recent=2,
           prefill_chunk=16, decode_budget=24, decode_buffer=2)
    assert len(policy.contexts) > 4  # after chunks and during decoding
    with torch.inference_mode():
        for ctx in policy.contexts:
            assert torch.equal(ctx.token_pos, ctx.token_pos.sort().values) and len(ctx.token_pos.unique()) == len(ctx.token_pos)
            assert set(ctx.token_pos.tolist()) == set(ctx.positions[ctx.valid].tolist())
            assert ctx.hidden.shape == (len(ctx.token_pos), args.dim)
    # the first eviction (after the second chunk) sees the first 32 tokens of each row, with no eviction before
    first = policy.contexts[:2]
    for b, ctx in enumerate(first):
        n = len(contexts[b])
        seen = [p for p in ctx.token_pos.tolist()]
        ids = torch.tensor(contexts[b])
        assert torch.equal(ctx.token_ids, ids[ctx.token_pos])
        with torch.inference_mode():
            full = model.hidden_states(ids[None, : seen[-1] + 1])[0]
        assert torch.allclose(ctx.hidden, full[ctx.token_pos], atol=1e-5), n
        scores = ctx.per_slot(ctx.token_pos.double())
        assert torch.equal(scores[ctx.valid], ctx.positions[ctx.valid].double())
