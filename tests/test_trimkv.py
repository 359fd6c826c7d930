"""TRIM-KV: a published-layout checkpoint (Qwen3 + retention gates) against transformers and the gate's definition;
the engine's eviction against a naive reference written from the definition; gates file IO; bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.random_model import random_model, random_prompts
from tests.test_tis import model_dir  # noqa: F401  (fixture: a small random model with a trained tokenizer)
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, decode, prefill
from tinytis.errors import UserError
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import make_policy
from tinytis.policies.trimkv import TrimKVPolicy
from tinytis.trimkv import GATES_FILE, RetentionGates

ROOT = Path(__file__).parents[1]
GATE_HIDDEN = 24


def published_gate_tensors(n_layers, dim, n_kv_heads, seed):
    """Random retention gates under the published names; biases near 3 give betas spread around 0.95."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(n_layers):
        name = f"model.layers.{i}.self_attn.retention_gate."
        tensors[name + "linear1.weight"] = torch.randn(GATE_HIDDEN, dim, generator=g) * 0.5
        tensors[name + "linear1.bias"] = torch.randn(GATE_HIDDEN, generator=g) * 0.1
        tensors[name + "linear2.weight"] = torch.randn(n_kv_heads, GATE_HIDDEN, generator=g) * 0.5
        tensors[name + "bias"] = 3 + torch.randn(n_kv_heads, generator=g)
    return tensors


def reference_log_beta(tensors, layer, x):
    """The published gate on a layer's normed hidden state x (T, dim): logsigmoid(W2 silu(W1 x + b1) + b) -> (KV, T)."""
    p = f"model.layers.{layer}.self_attn.retention_gate."
    h = F.silu(x @ tensors[p + "linear1.weight"].T + tensors[p + "linear1.bias"])
    return F.logsigmoid(h @ tensors[p + "linear2.weight"].T + tensors[p + "bias"]).T


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A random Qwen3 model saved by transformers, with the TRIM-KV config fields and trimkv_weights.pth beside it."""
    transformers = pytest.importorskip("transformers")
    from tests.test_parity import SHAPE, randomize

    hf = randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE, tie_word_embeddings=False)), seed=7)
    d = tmp_path_factory.mktemp("trimkv_qwen3")
    hf.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config.update(retention_gate="rg", retention_gate_intermediate_size=GATE_HIDDEN, retention_gate_bias_init=10.0,
                  memory_size=48, buffer_size=8, compress_memory=True, compress_strategy="alpha",
                  trainable_params="retention_gate", base_model="Qwen/Qwen3-random")
    (d / "config.json").write_text(json.dumps(config))
    cfg = hf.config
    tensors = published_gate_tensors(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, seed=8)
    torch.save(tensors, d / "trimkv_weights.pth")
    return hf, d, tensors


def test_published_checkpoint_matches_transformers_and_the_gate_definition(published):
    hf, d, tensors = published
    model = Transformer.from_pretrained(d)
    assert model.args.qk_norm
    ids = torch.randint(3, hf.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(9))
    normed = {}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, i, out, l=l: normed.__setitem__(l, out[0]))
             for l, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        expected = hf(ids).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        got = model(ids)
    assert torch.isfinite(got).all() and expected.abs().max() > 5
    assert (got - expected).abs().max().item() <= 1e-4

    policy = make_policy("trimkv", d, model.args)
    assert policy.gates.meta["memory_size"] == 48 and policy.gates.meta["buffer_size"] == 8
    state = prefill(model, [ids[0].tolist()], CacheManager(model.args, policy, ManagerConfig(1.0)))
    stored = state.cache.slot_value[:, 0, :, : ids.shape[1]]  # (L, KV, T): no eviction at budget 1.0
    for layer in range(model.args.n_layers):
        want = reference_log_beta(tensors, layer, normed[layer])
        assert want.std() > 0.05  # betas that differ, or ranking by them would prove nothing
        assert torch.allclose(stored[layer], want, atol=1e-5), (stored[layer] - want).abs().max()


ARGS = ModelArgs(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=96, vocab_size=300,
                 max_seq_len=1024, rope_theta=1e4)


def random_gates(args, seed=1):
    gates = RetentionGates(args, GATE_HIDDEN)
    named = published_gate_tensors(args.n_layers, args.dim, args.n_kv_heads, seed)
    gates.load_state_dict({f"layers.{k.split('.')[2]}.{k.split('retention_gate.')[1]}": v for k, v in named.items()})
    return gates.eval(), named


def layer_inputs(model, ids, positions=None):
    """Each layer's normed attention input (B, T, dim) in one forward, from hooks on the attention norms."""
    seen = {}
    hooks = [b.attention_norm.register_forward_hook(lambda m, i, out, l=l: seen.__setitem__(l, out))
             for l, b in enumerate(model.layers)]
    with torch.no_grad():
        model(ids, positions)
    for h in hooks:
        h.remove()
    return seen


def top_positions(log_beta, positions, t, k):
    """Naive TRIM-KV rule for one head: log alpha = (t - i) log beta_i, keep the k best (ties: the earlier token)."""
    ranked = sorted(range(len(positions)), key=lambda j: (-(t - positions[j]) * log_beta[j], positions[j]))
    return sorted(positions[j] for j in ranked[:k])


@pytest.mark.parametrize("budget", [7, 20, 45])
def test_prefill_eviction_keeps_the_top_retention_per_head(budget):
    model = random_model(ARGS, seed=3)
    gates, named = random_gates(ARGS)
    prompts = random_prompts(ARGS, [90, 61], seed=4)
    config = ManagerConfig(budget, n_sink=0, n_recent=0)
    state = prefill(model, prompts, CacheManager(ARGS, TrimKVPolicy(gates), config))
    for b, p in enumerate(prompts):
        inputs = layer_inputs(model, torch.tensor([p]))
        for layer in range(ARGS.n_layers):
            log_beta = reference_log_beta(named, layer, inputs[layer][0])  # (KV, T)
            for head in range(ARGS.n_kv_heads):
                want = top_positions(log_beta[head].tolist(), list(range(len(p))), len(p), budget)
                pos = state.cache.pos[layer, b, head]
                assert pos[pos >= 0].tolist() == want


def test_decoding_with_memory_and_buffer_matches_a_naive_simulation():
    """--decode-budget M --decode-buffer B: whenever a head holds more than M + B tokens, it keeps its top M."""
    model = random_model(ARGS, seed=5)
    gates, named = random_gates(ARGS, seed=6)
    prompt = random_prompts(ARGS, [40], seed=7)[0]
    M, B = 24, 5
    config = ManagerConfig(M, n_sink=0, n_recent=0, decode_budget=M, decode_buffer=B)
    state = prefill(model, [prompt], CacheManager(ARGS, TrimKVPolicy(gates), config))
    forwards = []  # per forward of the decode loop: each layer's normed input (T=1, dim), from the model itself

    def record(layer, out):
        if layer == 0:
            forwards.append({})
        forwards[-1][layer] = out[0]

    hooks = [blk.attention_norm.register_forward_hook(lambda m, i, out, l=l: record(l, out))
             for l, blk in enumerate(model.layers)]
    gen = decode(model, state, None, SamplingParams(max_new_tokens=30))
    for h in hooks:
        h.remove()

    log_beta, held = {}, {}  # (layer, head) -> {position: log beta}, [positions held]
    prompt_inputs = layer_inputs(model, torch.tensor([prompt]))
    for l in range(ARGS.n_layers):
        lb = reference_log_beta(named, l, prompt_inputs[l][0])
        for h in range(ARGS.n_kv_heads):
            log_beta[(l, h)] = dict(enumerate(lb[h].tolist()))
            held[(l, h)] = top_positions(lb[h].tolist(), list(range(len(prompt))), len(prompt), M)
    for step, forward in enumerate(forwards):
        t = len(prompt) + step  # the position of the token this forward wrote
        for l in range(ARGS.n_layers):
            lb = reference_log_beta(named, l, forward[l])  # (KV, 1)
            for h in range(ARGS.n_kv_heads):
                log_beta[(l, h)][t] = lb[h, 0].item()
                held[(l, h)].append(t)
                if len(held[(l, h)]) > M + B:
                    values = [log_beta[(l, h)][i] for i in held[(l, h)]]
                    held[(l, h)] = top_positions(values, held[(l, h)], t + 1, M)
    assert len(gen.tokens[0]) == 30 and len(forwards) == 29
    for (l, h), want in held.items():
        pos = state.cache.pos[l, 0, h]
        assert pos[pos >= 0].tolist() == want


def test_gates_file_round_trips_and_rejects_a_mismatched_model(tmp_path):
    gates, _ = random_gates(ARGS)
    gates.meta.update(memory_size=64, buffer_size=16)
    gates.save(tmp_path / GATES_FILE)
    loaded = RetentionGates.load(tmp_path, ARGS)
    assert loaded.meta["memory_size"] == 64
    for k, v in gates.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(UserError, match="4-layer"):
        RetentionGates.load(tmp_path, ModelArgs(**{**ARGS.to_dict(), "n_layers": 4}))
    with pytest.raises(UserError, match="another model"):
        RetentionGates.load(tmp_path, ModelArgs(**{**ARGS.to_dict(), "dim": 64, "head_dim": 16}))
    with pytest.raises(UserError, match="no TRIM-KV retention gates"):
        RetentionGates.load(tmp_path / "elsewhere", ARGS)


@pytest.mark.parametrize("command", [
    ["generate.py", "--prompt", "The grass is green.", "--policy", "trimkv", "--budget", "0.5"],
    ["eval.py", "niah", "--policies", "trimkv", "--lengths", "256", "--n-samples", "1"],
])
def test_trimkv_without_gates_is_one_line_and_exit_2(tmp_path, command):
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(ROOT / "models" / "tiny" / name, tmp_path / name)
    r = subprocess.run([sys.executable, *command, "--model", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no TRIM-KV retention gates" in lines[0] and "train.py trimkv" in lines[0], r.stderr


def _trimkv_args(model_dir, run_dir, out, resume=False):
    import argparse

    return argparse.Namespace(stage="trimkv", model=str(model_dir), out=str(out), steps=4, lr=3e-3, min_len=64, max_len=96,
                              memory_size=16, buffer_size=4, lambda_capacity=1.0, gate_hidden=8, n_sink=2, n_recent=4,
                              eval_every=1000, run_dir=str(run_dir), resume=resume, seed=0, save_every_s=0.0, threads=1)


def test_trimkv_training_resumes_to_the_same_gates(model_dir, tmp_path, monkeypatch):
    """An interrupted `train.py trimkv --resume` gives bit-identical gates to an uninterrupted run; training moved them."""
    from tinytis.train import trimkv as stage
    from tests.interrupt import interrupt_then_resume
    from tests.test_tis import SMALL

    monkeypatch.setattr(stage, "evaluate_eviction", lambda *a, **k: (0.0, 0.0))
    monkeypatch.setattr(stage, "TIS_TOKENS_PER_STEP", 256)
    stage.train_trimkv(_trimkv_args(model_dir, tmp_path / "a", tmp_path / "a.safetensors"))
    interrupt_then_resume(monkeypatch, stage, "trimkv_losses", 3, stage.train_trimkv,
                          _trimkv_args(model_dir, tmp_path / "b", tmp_path / "b.safetensors"),
                          _trimkv_args(model_dir, tmp_path / "b", tmp_path / "b.safetensors", resume=True))
    (tmp_path / "a").joinpath(GATES_FILE).symlink_to(tmp_path / "a.safetensors")
    (tmp_path / "b").joinpath(GATES_FILE).symlink_to(tmp_path / "b.safetensors")
    a, b = RetentionGates.load(tmp_path / "a", SMALL), RetentionGates.load(tmp_path / "b", SMALL)
    assert a.meta["memory_size"] == 16 and "train.py trimkv" in a.meta["command"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert (a.layers[0].bias - torch.log(torch.tensor(2 * 16 - 1.0))).abs().max() > 1e-4
