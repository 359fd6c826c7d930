"""PagedKVCache against the dense cache, and the pool's invariants under random append / evict / free.

- No eviction (policy full, or budget 1.0): logits bit-identical to the dense engine.
- Eviction (every policy, several budgets and modes): each forward of the paged engine equals a dense forward
  whose attention masks exactly the (layer, KV head, token) entries the paged cache had evicted before it
  (max abs diff <= 1e-5, fp32), and every kept K/V row is bit-identical to the one written for that token.
- Hypothesis: random appends, evictions and frees over several sequences and two caches sharing a pool.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinytis.cache import DenseKVCache, PagedKVCache, PagePool
from random_model import random_model, random_prompts
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, answer, generate
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies.baselines import Random

HEURISTICS = ["full", "random", "streaming", "h2o", "tova", "snapkv", "knorm", "oracle"]  # tis needs trained parts
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=101, rope_theta=1e4)


def tiny_model(seed=0):
    return random_model(ARGS, seed)


def prompts(lengths, seed=0):
    return random_prompts(ARGS, lengths, seed)


def record_logits(model):
    """Replace model.logits by a wrapper that keeps every result."""
    seen, logits = [], model.logits

    def wrapper(h):
        out = logits(h)
        seen.append(out)
        return out

    model.logits = wrapper
    return seen


# -- no eviction: bit-identical ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,budget", [("full", 0.5), ("snapkv", 1.0), ("h2o", 1.0), ("knorm", 1.0)])
def test_no_eviction_is_bit_identical_to_dense(policy, budget):
    batch = prompts([70, 93, 51, 93])
    params = SamplingParams(max_new_tokens=12)
    model = tiny_model()
    dense_logits = record_logits(model)
    dense = generate(model, batch, params)
    model = tiny_model()
    paged_logits = record_logits(model)
    paged = answer(model, batch, None, params, policy, budget, n_sink=4, n_recent=8)
    assert paged.tokens == dense.tokens
    assert len(paged_logits) == len(dense_logits) == 12
    for a, b in zip(paged_logits, dense_logits):
        assert torch.equal(a, b)
    assert paged.stats["tokens_held"] == [[sum(map(len, batch))] * ARGS.n_kv_heads] * ARGS.n_layers


@pytest.mark.parametrize("policy,budget", [("full", 1.0), ("h2o", 1.0)])
def test_one_unpadded_row_is_bit_identical_to_dense(policy, budget):
    """One row, no padding: the paged cache attends without a mask (plain causal), the dense cache with one."""
    params = SamplingParams(max_new_tokens=12)
    model = tiny_model()
    dense_logits = record_logits(model)
    dense = generate(model, prompts([77]), params)
    model = tiny_model()
    paged_logits = record_logits(model)
    paged = answer(model, prompts([77]), None, params, policy, budget, n_sink=4, n_recent=8)
    assert paged.tokens == dense.tokens
    assert len(paged_logits) == len(dense_logits) == 12
    assert all(torch.equal(a, b) for a, b in zip(paged_logits, dense_logits))


def test_sliding_window_is_bit_identical_to_dense():
    args = ModelArgs(**{**ARGS.__dict__, "sliding_window": 24})
    batch, params = prompts([60, 41]), SamplingParams(max_new_tokens=8)
    models = [Transformer(args), Transformer(args)]
    for model in models:
        model.init_weights(0, std=0.1)
    dense_logits, paged_logits = record_logits(models[0]), record_logits(models[1])
    dense = generate(models[0], batch, params)
    paged = answer(models[1], batch, None, params, "full", 1.0)
    assert paged.tokens == dense.tokens
    assert len(paged_logits) == len(dense_logits) == 8
    assert all(torch.equal(a, b) for a, b in zip(paged_logits, dense_logits))


def test_generate_with_a_paged_cache_is_bit_identical():
    batch = prompts([33, 64, 17])
    params = SamplingParams(max_new_tokens=10)
    model = tiny_model()
    dense_logits = record_logits(model)
    dense = generate(model, batch, params)
    cache = PagedKVCache(ARGS, 3, PagePool(ARGS.head_dim, 16, 1))  # the pool grows as needed
    model = tiny_model()
    paged_logits = record_logits(model)
    paged = generate(model, batch, params, cache=cache)
    assert paged.tokens == dense.tokens
    assert all(torch.equal(a, b) for a, b in zip(paged_logits, dense_logits))


# -- eviction: equal to a dense forward that masks the evicted entries --------------------------------------------

class MaskedDenseCache(DenseKVCache):
    """The dense cache, attending with plain softmax math and a key mask allowed (B, KV, Tk) per layer (set before
    each forward): past keys only where allowed, the forward's own keys always."""

    def attend(self, layer, q, k, v, x=None):
        self.k[layer, :, :, self.start : self.length] = k
        self.v[layer, :, :, self.start : self.length] = v
        keys, values = self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]
        G = q.shape[1] // keys.shape[1]
        q_pos, k_pos = self.pos[:, self.start : self.length], self.pos[:, : self.length]
        causal = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (k_pos[:, None, None, :] >= 0)  # (B, 1, Tq, Tk)
        keep = self.allowed[layer][:, :, None, :] & causal  # (B, KV, Tq, Tk)
        keep = keep.repeat_interleave(G, dim=1) | (q_pos < 0)[:, None, :, None]  # padded queries: anything
        logits = q @ keys.repeat_interleave(G, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = logits.masked_fill(~keep, -math.inf).softmax(-1)
        return probs @ values.repeat_interleave(G, dim=1)


def record_forwards(model):
    """Wrap model.hidden_states to keep, per forward: ids, positions, output, and the cache's held entries just
    before it, as {(layer, row, KV head): set of positions}; and wrap the cache's attend to keep every K/V written."""
    forwards, writes, hidden_states = [], {}, model.hidden_states

    def wrap_attend(cache):
        attend = cache.attend

        def recording(layer, q, k, v, x=None, rope=None):
            k_rot = k if rope is None else rope.apply(k)  # the model hands k unrotated with its Rope
            for b, t in (cache.q_pos >= 0).nonzero().tolist():
                writes[layer, b, int(cache.q_pos[b, t])] = (k_rot[b, :, t].clone(), v[b, :, t].clone())
            return attend(layer, q, k, v, x, rope)

        cache.attend = recording

    def wrapper(ids, positions, cache):
        if not forwards:
            wrap_attend(cache)
        held = {}
        L, B, KV = cache.length.shape
        for l in range(L):
            for b in range(B):
                for h in range(KV):
                    pos = cache.pos[l, b, h, : cache.length[l, b, h]]
                    assert (pos >= 0).all() and (pos.diff() > 0).all()
                    held[l, b, h] = set(pos.tolist())
                    for s, p in enumerate(pos.tolist()):  # kept K/V bytes are the ones written for that token
                        row = cache.table[l, b, h, s // cache.pool.page_size] * cache.pool.page_size + s % cache.pool.page_size
                        k, v = writes[l, b, p]
                        assert torch.equal(cache.pool.rows("k")[row], k[h]) and torch.equal(cache.pool.rows("v")[row], v[h])
        out = hidden_states(ids, positions, cache)
        forwards.append((ids, positions, held, out))
        return out

    model.hidden_states = wrapper
    return forwards


def replay_dense(model, forwards):
    """Run the recorded forwards through a MaskedDenseCache; return the max abs logit difference on real tokens."""
    B = forwards[0][0].shape[0]
    total = sum(ids.shape[1] for ids, *_ in forwards)
    cache = MaskedDenseCache(ARGS, B, total)
    column_of = {}  # (row, position) -> the newest dense column holding it
    worst = 0.0
    for ids, positions, held, paged_out in forwards:
        Tk = cache.length + ids.shape[1]
        allowed = torch.zeros(ARGS.n_layers, B, ARGS.n_kv_heads, Tk, dtype=torch.bool)
        allowed[..., cache.length :] = True  # the forward's own tokens
        for (l, b, h), kept in held.items():
            for p in kept:
                allowed[l, b, h, column_of[b, p]] = True
        for b, t in (positions >= 0).nonzero().tolist():
            column_of[b, int(positions[b, t])] = cache.length + t
        cache.allowed = allowed
        with torch.inference_mode():
            out = Transformer.hidden_states(model, ids, positions, cache)
            real = positions >= 0
            worst = max(worst, (model.output(out[real]) - model.output(paged_out[real])).abs().max().item())
    return worst


MODES = {  # mode -> budget, manager options
    "oneshot": (0.4, dict()),
    "tiny": (0.12, dict()),  # 8 to 11 tokens: the anchors get 2
    "chunked": (40, dict(prefill_chunk=24)),
    "decode": (0.4, dict(decode_budget=0.3, decode_buffer=3)),
    "ada-pyramid": (0.4, dict(head_adaptive=True, schedule="pyramid")),
}


@pytest.mark.parametrize("mode", ["oneshot", "decode", "ada-pyramid"])
@pytest.mark.parametrize("policy", ["h2o", "knorm"])
def test_evicted_one_row_equals_masked_dense(policy, mode):
    """One row: without padding the paged cache attends without a mask, unless its heads hold different numbers of
    slots (ada-pyramid)."""
    budget, options = MODES[mode]
    model = tiny_model()
    forwards = record_forwards(model)
    gen = answer(model, prompts([90], seed=1), prompts([5], seed=2), SamplingParams(max_new_tokens=10), policy, budget,
                 n_sink=4, n_recent=8, **options)
    assert sum(map(sum, gen.stats["tokens_held"])) < gen.stats["tokens_full"] * ARGS.n_layers * ARGS.n_kv_heads
    assert len(forwards) >= 10
    assert replay_dense(tiny_model(), forwards) <= 1e-5


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("policy", HEURISTICS)
def test_evicted_forward_equals_masked_dense(policy, mode):
    if policy == "oracle" and mode == "chunked":
        pytest.skip("the oracle scores the whole context in one pass")
    contexts = prompts([90, 67, 75], seed=1)
    questions = prompts([5, 9, 3], seed=2)
    references = prompts([6, 4, 8], seed=3) if policy == "oracle" else None
    budget, options = MODES[mode]
    model = tiny_model()
    forwards = record_forwards(model)
    gen = answer(model, contexts, questions, SamplingParams(max_new_tokens=10), policy, budget, references=references,
                 n_sink=4, n_recent=8, **options)
    held = sum(map(sum, gen.stats["tokens_held"]))
    full = gen.stats["tokens_full"] * ARGS.n_layers * ARGS.n_kv_heads
    assert held == full if policy == "full" else held < full
    assert len(forwards) >= 10
    assert replay_dense(tiny_model(), forwards) <= 1e-5


# -- the pool under random operations -------------------------------------------------------------------------------

SMALL = ModelArgs(dim=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, hidden_dim=8, vocab_size=10)


def code(layer, b, h, pos):
    """The K value written for a token: identifies (layer, row, KV head, position) exactly in fp32."""
    return float(((layer * 8 + b) * 4 + h) * 10_000 + pos)


class Sequences:
    """Rows of one cache with a manager, fed by hand: tokens, evictions at a budget, frees."""

    def __init__(self, pool, B, n_sink, n_recent, share, head_adaptive):
        self.cache = PagedKVCache(SMALL, B, pool)
        self.manager = CacheManager(SMALL, Random(seed=B), ManagerConfig(1.0, n_sink=n_sink, n_recent=n_recent,
                                                                          anchor_share=share, head_adaptive=head_adaptive))
        self.manager.start(self.cache, [1] * B)
        self.next = [0] * B

    def append(self, counts):
        T = max(counts)
        positions = torch.full((len(counts), T), -1, dtype=torch.long)
        for b, n in enumerate(counts):
            positions[b, T - n :] = torch.arange(self.next[b], self.next[b] + n)
            self.next[b] += n
        c = self.cache
        c.begin_forward(positions)
        B, KV = len(counts), SMALL.n_kv_heads
        for layer in range(SMALL.n_layers):
            k = torch.zeros(B, KV, T, SMALL.head_dim)
            for b in range(B):
                for h in range(KV):
                    for t in range(T):
                        k[b, h, t] = code(layer, b, h, int(positions[b, t]))
            c.attend(layer, torch.randn(B, SMALL.n_heads, T, SMALL.head_dim), k, -k)
        ids = torch.zeros_like(positions)
        self.manager.after_step(c, ids, positions, torch.zeros(B, T, SMALL.dim))

    def free(self, b):
        self.cache.free([b])
        self.next[b] = 0
        self.manager.tokens[b].keep(torch.zeros_like(self.manager.tokens[b].pos, dtype=torch.bool))
        self.manager.last_pos[b] = -1


def held(cache):
    return {(l, b, h): cache.pos[l, b, h, : cache.length[l, b, h]].tolist()
            for l in range(cache.length.shape[0]) for b in range(cache.length.shape[1]) for h in range(cache.length.shape[2])}


def check_pool(pool, caches):
    ps = pool.page_size
    in_tables = torch.cat([c.table[c.table >= 0] for c in caches]).tolist()
    free = pool.free_ids[: pool.n_free].tolist()
    assert len(set(in_tables)) == len(in_tables), "a page is in two tables"
    assert not set(in_tables) & set(free), "a page is both held and free"
    assert sorted(in_tables + free) == list(range(pool.n_pages)), "a page leaked"
    assert pool.used == len(in_tables) == sum(c.pages_held() for c in caches)
    for c in caches:
        n_pages = (c.length + ps - 1) // ps
        cols = torch.arange(c.table.shape[-1])
        assert torch.equal(c.table >= 0, cols < n_pages[..., None]), "a head holds pages it does not need, or lacks some"
        for (l, b, h), pos in held(c).items():
            assert all(p >= 0 for p in pos) and all(x < y for x, y in zip(pos, pos[1:])), "positions not increasing"
            assert (c.pos[l, b, h, len(pos):] == -1).all()
            for s, p in enumerate(pos):
                row = c.table[l, b, h, s // ps] * ps + s % ps
                assert pool.rows("k")[row].eq(code(l, b, h, p)).all() and pool.rows("v")[row].eq(-code(l, b, h, p)).all()


op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 1), st.lists(st.integers(0, 9), min_size=3, max_size=3)),
    st.tuples(st.just("evict"), st.integers(0, 1), st.integers(-5, 12)),
    st.tuples(st.just("free"), st.integers(0, 1), st.integers(0, 2)),
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=14), n_sink=st.integers(0, 2), n_recent=st.integers(0, 3),
       share=st.sampled_from([0.0, 0.25, 0.5, 1.0]), head_adaptive=st.booleans(), page_size=st.sampled_from([1, 2, 4]))
def test_pool_invariants_under_random_operations(ops, n_sink, n_recent, share, head_adaptive, page_size):
    pool = PagePool(SMALL.head_dim, page_size, 3)
    groups = [Sequences(pool, 3, n_sink, n_recent, share, head_adaptive),
              Sequences(pool, 2, n_sink, n_recent, share, head_adaptive)]
    for kind, which, arg in ops:
        seqs = groups[which]
        B = seqs.cache.length.shape[1]
        if kind == "append":
            if max(arg[:B]) > 0:  # a forward has at least one token
                seqs.append(arg[:B])
        elif kind == "free":
            seqs.free(arg % B)
        else:
            k = max(1, n_sink + n_recent + arg)  # the anchors get at most share * k: the sinks, then the newest
            budget = torch.full((SMALL.n_layers, B), k)
            before, last = held(seqs.cache), seqs.manager.last_pos.clone()
            seqs.manager.evict(seqs.cache, budget)
            after = held(seqs.cache)
            sinks = min(n_sink, int(share * k))
            recent = min(n_recent, int(share * k) - sinks)
            for (l, b, h), pos in after.items():
                assert set(pos) <= set(before[l, b, h]), "eviction added a token"
                anchors = {p for p in before[l, b, h] if p < sinks or p > last[b] - recent}
                assert anchors <= set(pos), "an anchor was evicted"
                if not head_adaptive:
                    assert len(pos) == min(len(before[l, b, h]), int(budget[l, b]))
            if head_adaptive:
                for l in range(SMALL.n_layers):
                    for b in range(B):
                        n_before = sum(len(before[l, b, h]) for h in range(SMALL.n_kv_heads))
                        n_after = sum(len(after[l, b, h]) for h in range(SMALL.n_kv_heads))
                        assert n_after == min(n_before, int(budget[l, b]) * SMALL.n_kv_heads)
        check_pool(pool, [g.cache for g in groups])
    for seqs in groups:
        seqs.cache.free(list(range(seqs.cache.length.shape[1])))
    assert pool.used == 0


def test_fork_copies_pages_and_shares_the_pool():
    pool = PagePool(SMALL.head_dim, 2, 2)
    seqs = Sequences(pool, 2, 1, 1, 0.25, False)
    seqs.append([5, 3])
    other = seqs.cache.fork()
    check_pool(pool, [seqs.cache, other])
    assert held(other) == held(seqs.cache)
    assert pool.used == 2 * seqs.cache.pages_held()
    seqs.cache.free([0, 1])
    check_pool(pool, [seqs.cache, other])
    assert pool.used == other.pages_held() > 0
