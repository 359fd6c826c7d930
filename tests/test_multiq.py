"""The multi-question task: the generator and scorer (exact values), a finished row writes nothing more into its
cache, TIS's decode-time eviction reads the hidden states of the decoded tokens, and eval.py's multiq answers are
those of one growing transcript decoded with a full dense cache."""
from pathlib import Path

import pytest
import torch

from random_model import random_model, random_prompts
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, decode, generate, prefill
from tinytis.evaluate import MAX_NEW_TOKENS, Evaluator
from tinytis.grid import CellKey, make_samples
from tinytis.importance import TIS
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.policies import TISPolicy, make_policy
from tinytis.tasks import multiq
from tinytis.tasks.niah import MULTIKEY_FACT, PASSKEY_NEEDLE, PASSKEY_QUERY

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=101, rope_theta=1e4)
WORDS = lambda s: len(s.split())  # noqa: E731  a token count for the generator: one token per word


def test_generator_exact_sample():
    s = multiq.make(1_000_000_123, 120, WORDS)
    assert [q for q, _ in multiq.questions(s)] == [
        PASSKEY_QUERY,
        "What is the secret code of Theo? The secret code of Theo is",
        "What is the secret code of Max? The secret code of Max is",
        "What is the secret code of Noah? The secret code of Noah is",
    ]
    assert [a for _, a in multiq.questions(s)] == ["50738", "67935", "10041", "60363"]
    assert (s.task, s.length, s.depth) == ("multiq", 120, -1.0)
    facts = [PASSKEY_NEEDLE.format(k="50738")]
    facts += [MULTIKEY_FACT.format(name=n, code=c) for n, c in (("Theo", "67935"), ("Max", "10041"), ("Noah", "60363"))]
    assert [s.context.count(f) for f in facts] == [1, 1, 1, 1]
    assert sorted(facts, key=s.context.index) == [facts[1], facts[3], facts[0], facts[2]]  # at their random depths
    assert WORDS(s.context) == 119  # the haystack fills up to the length with whole sentences
    assert multiq.make(1_000_000_123, 120, WORDS) == s  # a function of its seed


def test_scorer_exact_fractions():
    s = multiq.make(1_000_000_123, 120, WORDS)
    assert multiq.score(["50738", "67935", "10041", "60363"], s) == 1.0
    assert multiq.score([" 50738 ", "67935", "1004", "6036 3"], s) == 0.5  # surrounding spaces do not count
    assert multiq.score(["67935", "50738", "0", ""], s) == 0.0  # right codes for the wrong questions
    assert multiq.score(["50738", "", "", ""], s) == 0.25
    with pytest.raises(ValueError):
        multiq.score(["50738"], s)


def test_a_finished_row_writes_nothing_more_into_its_cache():
    model = random_model(ARGS, 3)
    contexts = random_prompts(ARGS, [40, 33], seed=4)
    params = SamplingParams(max_new_tokens=8)
    free = decode(model, prefill(model, contexts, CacheManager(ARGS, make_policy("full"), ManagerConfig(1.0))), None, params)
    eos = free.tokens[0][2]  # row 0 stops at its third token
    assert eos not in free.tokens[1] and eos not in free.tokens[0][:2]
    state = prefill(model, contexts, CacheManager(ARGS, make_policy("full"), ManagerConfig(1.0)))
    gen = decode(model, state, None, params, eos_id=eos)
    assert gen.tokens == [free.tokens[0][:2], free.tokens[1]]
    # row 0: context + its two answer tokens; row 1: context + every token but the last (never fed)
    assert (state.cache.length[:, 0] == 40 + 2).all() and (state.cache.length[:, 1] == 33 + 7).all()
    assert int(state.cache.pos[:, 0].max()) == 41


def test_tis_decode_time_eviction_scores_the_decoded_tokens_by_their_hidden_states():
    """Budget 24 + buffer 4 held through a 40-token decode; every held token's recorded hidden state is the one the
    engine computed for it, so TIS scores decoded tokens like context tokens."""
    model = random_model(ARGS, 0)
    torch.manual_seed(0)
    policy = TISPolicy(TIS(ARGS))
    manager = CacheManager(ARGS, policy, ManagerConfig(24, n_sink=4, n_recent=8, decode_budget=24, decode_buffer=4))
    contexts = random_prompts(ARGS, [64, 50])
    state = prefill(model, contexts, manager)
    hidden = {}  # (row, position) -> the final-layer hidden state the engine computed
    lengths = []
    record = manager.after_step

    def watch(cache, ids, positions, h):
        for b in range(len(contexts)):
            for t in range(ids.shape[1]):
                if positions[b, t] >= 0:
                    hidden[(b, int(positions[b, t]))] = h[b, t].clone()
        record(cache, ids, positions, h)
        lengths.append(cache.length.clone())

    manager.after_step = watch
    gen = decode(model, state, random_prompts(ARGS, [5, 3], seed=1), SamplingParams(max_new_tokens=40))
    assert len(gen.tokens[0]) == 40
    assert all((n <= 24 + 4).all() for n in lengths) and any((n == 28).all() for n in lengths)
    for b, store in enumerate(manager.tokens):
        held = state.cache.pos[:, b]
        assert store.pos.tolist() == sorted(set(held[held >= 0].tolist()))
        decoded = [i for i, p in enumerate(store.pos.tolist()) if p >= len(contexts[b])]
        assert len(decoded) >= 8  # the newest tokens (anchors) are decoded ones
        for i in decoded:
            assert torch.equal(store.hidden[i], hidden[(b, int(store.pos[i]))])


def test_multiq_answers_are_one_transcript_decoded_with_a_full_cache():
    """Full cache: each answer equals a dense-cache greedy run on context + q1 + a1 + ... + q_k."""
    from tinytis.model import Transformer
    from tinytis.tokenizer import Tokenizer

    model_dir = Path(__file__).parents[1] / "models" / "tiny"
    model, tok = Transformer.from_pretrained(model_dir), Tokenizer.from_dir(model_dir)
    count = lambda s: len(tok.encode(s, bos=False))  # noqa: E731
    samples = make_samples(CellKey("multiq", "4q", "id", 200, -1.0), 2, 0, count)
    evaluator = Evaluator(model, tok, model_dir)
    state = prefill(model, [tok.encode(s.context) for s in samples], CacheManager(model.args, make_policy("full"),
                                                                                   ManagerConfig(1.0)))
    first = [tok.encode(s.question, bos=False) for s in samples]
    predictions, _ = evaluator.converse(model, state, samples, first)
    for s, got in zip(samples, predictions):
        transcript, answers = tok.encode(s.context), []
        for q, _ in multiq.questions(s):
            transcript += tok.encode(q, bos=False)
            tokens = generate(model, [transcript], SamplingParams(MAX_NEW_TOKENS), tok.eos_id).tokens[0]
            answers.append(tok.decode(tokens))
            transcript += tokens if len(tokens) < MAX_NEW_TOKENS else tokens[:-1]
        assert got == answers
