"""DMS against oracles: llama3 RoPE and the Llama-3.2-style DMS checkpoint layout against transformers' Llama, the
engine's eviction decisions against a naive per-token DMS written here from the method's definition, and the
one-line errors for a DMS policy without its model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.random_model import random_model, random_prompts
from tinytis.config import ModelArgs
from tinytis.dms import DMSConfig, SequenceAttention, attach
from tinytis.engine import SamplingParams, decode, prefill
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import make_policy
from tinytis.policies.dms import DMSPolicy

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # wavelengths of head_dim 16 at theta 500 straddle 16..64
SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500.0,
             tie_word_embeddings=True, attn_implementation="eager")
METADATA = {"schema_version": 1, "decision_source": "borrowed_query_channel_v1", "window_size": 16,
            "alpha_scale": 100.0, "alpha_offset": 5.0, "borrowed_query_channel": -1, "target_compression_ratio": 8,
            "num_layers": 3, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}


# ---------------------------------------------------------------------------- transformers' Llama as the oracle

def hf_llama(rope_scaling):
    transformers = pytest.importorskip("transformers")
    from tests.test_parity import randomize

    config = transformers.LlamaConfig(**SHAPE, rope_scaling=rope_scaling)
    return randomize(transformers.LlamaForCausalLM(config), seed=5)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_llama3_rope_matches_transformers(tmp_path):
    hf = hf_llama(LLAMA3_ROPE)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.args.rope_scaling["factor"] == 8.0
    ids = random_prompts(ours.args, [200], seed=1)[0]
    expected = hf_logits(hf, ids)
    assert (ours(torch.tensor([ids])) - expected).abs().max() <= 1e-4
    ours.args.rope_scaling = None  # the scaling must matter, or this test would prove nothing
    assert (ours(torch.tensor([ids])) - expected).abs().max() > 0.1


def test_llama_dms_checkpoint_matches_transformers_with_the_channel_zeroed(tmp_path, monkeypatch):
    """A Llama-3.2-style DMS checkpoint: llama3 RoPE, tied embeddings, dms fields in config.json and
    dms_metadata.json. With the full cache its logits are Llama's with the borrowed query channel (the last one of
    each group's first head) zeroed before and after RoPE."""
    hf = hf_llama(LLAMA3_ROPE)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(dms_window_size=16, dms_alpha_scale=100.0, dms_alpha_offset=5.0, dms_cr=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "dms_metadata.json").write_text(json.dumps({"dms": METADATA}))
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.dms.window_size == 16 and ours.args.tie_embeddings
    ids = random_prompts(ours.args, [200], seed=2)[0]
    plain = hf_logits(hf, ids)

    from transformers.models.llama import modeling_llama

    rotate = modeling_llama.apply_rotary_pos_emb

    def zeroed(q, k, cos, sin, *args, **kwargs):  # q: (B, H, T, D); first head of each group of 2
        q = q.clone()
        q[:, ::2, :, -1] = 0
        q, k = rotate(q, k, cos, sin, *args, **kwargs)
        q[:, ::2, :, -1] = 0
        return q, k

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", zeroed)
    expected = hf_logits(hf, ids)
    got = ours(torch.tensor([ids]))
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2  # zeroing the channel changes the model


# ---------------------------------------------------------------------------- a naive per-token DMS

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=97, max_seq_len=512)
WINDOW = 6


def dms_model(window=WINDOW):
    model = random_model(ARGS, seed=3)
    attach(model, DMSConfig(window_size=window, alpha_scale=100.0, alpha_offset=5.0))
    return model


def rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, pos, theta):
    """One vector per head (H, D) at position pos, rotating pairs (i, i + D/2)."""
    D = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, D, 2).double() / D)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


@torch.no_grad()
def naive_dms(model, ids):
    """Token by token, in float64, from the definition: the eviction logit of token t in each layer is the last
    channel of the first query head of each GQA group before RoPE, x 100 - 5; it decides about token t - 1; a token
    decided 'evict' is seen only by queries at most WINDOW after it. Returns the decisions (L, KV, T) (the last
    token's is unknown: False) and the logits (T, V)."""
    a, m = model.args, model.double()
    G, D = a.n_heads // a.n_kv_heads, a.head_dim
    T = len(ids)
    evict = torch.zeros(a.n_layers, a.n_kv_heads, T, dtype=torch.bool)
    keys = [[[] for _ in range(a.n_kv_heads)] for _ in range(a.n_layers)]
    values = [[[] for _ in range(a.n_kv_heads)] for _ in range(a.n_layers)]
    out = []
    for t, token in enumerate(ids):
        x = m.tok_embeddings.weight[token]
        for l, block in enumerate(m.layers):
            att = block.attention
            h = rms(x, block.attention_norm.weight, a.norm_eps)
            q = (att.wq.weight @ h).view(a.n_heads, D)
            k = (att.wk.weight @ h).view(a.n_kv_heads, D)
            v = (att.wv.weight @ h).view(a.n_kv_heads, D)
            for g in range(a.n_kv_heads):
                if t > 0:
                    evict[l, g, t - 1] = q[g * G, D - 1] * 100 - 5 > 0
                q[g * G, D - 1] = 0
            q, k = rope(q, t, a.rope_theta), rope(k, t, a.rope_theta)
            for g in range(a.n_kv_heads):
                q[g * G, D - 1] = 0
            for g in range(a.n_kv_heads):
                keys[l][g].append(k[g])
                values[l][g].append(v[g])
            heads = []
            for hd in range(a.n_heads):
                g = hd // G
                seen = [p for p in range(t + 1) if t - p <= WINDOW or not evict[l, g, p]]
                K, V = torch.stack([keys[l][g][p] for p in seen]), torch.stack([values[l][g][p] for p in seen])
                heads.append(torch.softmax(K @ q[hd] / D**0.5, 0) @ V)
            x = x + att.wo.weight @ torch.cat(heads)
            hf = rms(x, block.ffn_norm.weight, a.norm_eps)
            ff = block.feed_forward
            x = x + ff.w2.weight @ (torch.nn.functional.silu(ff.w1.weight @ hf) * (ff.w3.weight @ hf))
        out.append(m.output.weight @ rms(x, m.norm.weight, a.norm_eps))
    model.float()
    return evict, torch.stack(out).float()


def held_positions(cache, b=0):
    """Positions held per (layer, KV head) of sequence b."""
    return [[sorted(p[p >= 0].tolist()) for p in layer] for layer in cache.pos[:, b]]


@pytest.mark.parametrize("chunk", [None, 7])
def test_engine_evicts_what_the_naive_reference_decides(chunk):
    """Prefill (one shot or in chunks of 7) then a few decode steps: after each forward every (layer, KV head) holds
    exactly the tokens the next query sees in the naive reference, and the logits agree."""
    model = dms_model()
    context = random_prompts(ARGS, [40], seed=4)[0]
    manager = CacheManager(ARGS, DMSPolicy(model.dms), ManagerConfig(1.0, prefill_chunk=chunk))
    state = prefill(model, [context], manager)
    gen = decode(model, state, None, SamplingParams(max_new_tokens=6), eos_id=None)
    ids = context + gen.tokens[0]
    evict, logits = naive_dms(model, ids)
    assert 0.2 < evict.float().mean() < 0.8  # decisions of both kinds, or the test would prove little
    assert (logits[len(context) - 1] - state.logits[0]).abs().max() <= 1e-4
    assert gen.tokens[0] == logits[len(context) - 1 :].argmax(-1)[: len(gen.tokens[0])].tolist()
    T = len(ids) - 1  # the last token was sampled, never fed
    expected = [[[p for p in range(T) if T - p <= WINDOW or not evict[l, g, p]] for g in range(ARGS.n_kv_heads)]
                for l in range(ARGS.n_layers)]
    assert held_positions(state.cache) == expected
    assert state.cache.length.sum() < ARGS.n_layers * ARGS.n_kv_heads * T  # pages were freed
    state.free()


def test_left_padded_batch_matches_each_alone():
    model = dms_model()
    contexts = random_prompts(ARGS, [9, 30, 23], seed=6)
    policy = DMSPolicy(model.dms)
    together = prefill(model, contexts, CacheManager(ARGS, policy, ManagerConfig(1.0)))
    for b, context in enumerate(contexts):
        alone = prefill(model, [context], CacheManager(ARGS, policy, ManagerConfig(1.0)))
        assert held_positions(together.cache, b) == held_positions(alone.cache)
        assert (together.logits[b] - alone.logits[0]).abs().max() <= 1e-4


def test_strict_mask_sequence_attention_matches_the_naive_reference():
    """The whole-sequence attention of training and of the gate (hard decisions): same decisions, same logits."""
    model = dms_model()
    ids = random_prompts(ARGS, [35], seed=7)[0]
    evict, expected = naive_dms(model, ids)
    attention = SequenceAttention(model.dms)
    logits = model(torch.tensor([ids]), cache=attention)[0]
    assert (logits - expected).abs().max() <= 1e-4
    decided = torch.stack([a[0] for a in attention.alpha]).bool()  # (L, KV, T)
    assert torch.equal(decided[..., :-1], evict[..., :-1])


def test_full_policy_on_a_dms_model_is_the_dms_model_without_eviction():
    model = dms_model()
    ids = random_prompts(ARGS, [30], seed=8)[0]
    state = prefill(model, [ids], CacheManager(ARGS, make_policy("full"), ManagerConfig(1.0)))
    assert (state.logits[0] - model(torch.tensor([ids]))[0, -1]).abs().max() <= 1e-5
    assert state.cache.length.min() == len(ids)


def test_full_policy_on_a_dms_model_through_the_kernels_matches_torch(monkeypatch):
    """A DMS model rotates its own q and k, so a kernel decode step writes them into the pages as they are (no fused
    RoPE) before the paged decode attention: the same tokens as the torch backend, for a left-padded batch."""
    pytest.importorskip("triton")
    from tinytis import kernels

    # the paged decode kernel takes head_dim >= 16
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=97)
    model = random_model(args, seed=3)
    attach(model, DMSConfig(window_size=WINDOW, alpha_scale=100.0, alpha_offset=5.0))
    contexts = random_prompts(args, [9, 30], seed=8)

    def run(backend):
        monkeypatch.setattr(kernels, "BACKEND", backend)
        before = kernels.CALLS.copy()
        state = prefill(model, contexts, CacheManager(args, make_policy("full"), ManagerConfig(1.0)))
        gen = decode(model, state, None, SamplingParams(max_new_tokens=6), eos_id=None)
        return gen.tokens, kernels.CALLS - before

    ref_tokens, ref_calls = run("torch")
    tokens, calls = run("triton")
    assert tokens == ref_tokens and ref_calls == {}
    assert calls == {"paged_decode_attention": args.n_layers * 5}  # 6 tokens: 5 decode steps fed


# ---------------------------------------------------------------------------- bad input

def run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_dms_policy_for_a_model_without_dms_metadata_is_a_one_line_error():
    r = run("generate.py", "--model", "models/tiny", "--policy", "dms", "--prompt", "The grass is green.")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "dms_metadata.json" in r.stderr


def test_eval_dms_without_its_model_is_a_one_line_error(tmp_path):
    r = run("eval.py", "fidelity", "--policies", "full,dms", "--dms-model", tmp_path / "missing", "--output",
            tmp_path / "out.csv")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr


def test_foreign_dms_metadata_is_a_user_error(tmp_path):
    from tinytis.errors import UserError

    (tmp_path / "dms_metadata.json").write_text(json.dumps(dict(METADATA, num_layers=2, head_dim=8, num_kv_heads=8)))
    with pytest.raises(UserError, match="num_kv_heads=8"):
        DMSConfig.load(tmp_path, ARGS)
