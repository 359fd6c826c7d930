"""tinytis against transformers as the oracle: same random weights, same logits, same greedy tokens.

Each model is built and saved by transformers (HF layout). The Mistral one is also written here in
the consolidated layout: consolidated names, params.json, and wq/wk rows permuted back to RoPE on
interleaved pairs with an index map written independently of tinytis.weights.
"""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from tinytis.engine import SamplingParams, generate  # noqa: E402
from tinytis.model import Transformer  # noqa: E402

VOCAB = 1000
PROMPT_LEN = 200
NEW_TOKENS = 32
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500.0,
             attn_implementation="eager")


def randomize(model, seed):
    """Weights large enough for sharp attention and logits in the tens; norm weights away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def mistral(sliding_window=None):
    return randomize(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=sliding_window)), seed=1)


def llama_tied():
    model = randomize(LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)), seed=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def qwen3():
    """Qwen3: q/k RMSNorm over head_dim before RoPE; its config names a window that use_sliding_window leaves off."""
    return randomize(Qwen3ForCausalLM(Qwen3Config(**SHAPE, tie_word_embeddings=True, sliding_window=16)), seed=4)


CONSOLIDATED_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.attention.w\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]


def consolidated_name(hf_name):
    for pattern, target in CONSOLIDATED_NAMES:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, target, hf_name)
    raise KeyError(hf_name)


def halves_to_interleaved(w, n_heads):
    """HF rows rotate pairs (i, i + D/2) of each head; consolidated rows rotate pairs (2i, 2i + 1)."""
    D = w.shape[0] // n_heads
    rows = []
    for h in range(n_heads):
        for i in range(D // 2):
            rows += [h * D + i, h * D + D // 2 + i]
    return w[rows]


def save_consolidated(model, path):
    cfg = model.config
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            w = halves_to_interleaved(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = halves_to_interleaved(w, cfg.num_key_value_heads)
        state[consolidated_name(name)] = w.contiguous()
    path.mkdir()
    save_file(state, path / "consolidated.safetensors")
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, head_dim=cfg.head_dim, hidden_dim=cfg.intermediate_size,
                  n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, norm_eps=cfg.rms_norm_eps,
                  vocab_size=cfg.vocab_size, rope_theta=cfg.rope_parameters["rope_theta"])
    (path / "params.json").write_text(json.dumps(params))
    return path


def prompt(seed, length=PROMPT_LEN):
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_greedy(model, ids, n):
    """Greedy decoding by recomputing the full sequence each step: no KV cache involved."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def assert_parity(hf_model, path):
    ours = Transformer.from_pretrained(path)
    ids = prompt(seed=3)
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits
        got = ours(torch.tensor([ids]))
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    assert expected.abs().max() > 5  # logits of a size where a wrong weight would show
    tokens = generate(ours, [ids], SamplingParams(max_new_tokens=NEW_TOKENS)).tokens[0]
    assert tokens == hf_greedy(hf_model, ids, NEW_TOKENS)
    return diff


@pytest.fixture(scope="module")
def mistral_model():
    return mistral()


def test_mistral_hf_layout(mistral_model, tmp_path):
    mistral_model.save_pretrained(tmp_path)
    assert_parity(mistral_model, tmp_path)


def test_mistral_consolidated_layout(mistral_model, tmp_path):
    assert_parity(mistral_model, save_consolidated(mistral_model, tmp_path / "consolidated"))


def test_mistral_sharded_hf_layout(mistral_model, tmp_path):
    mistral_model.save_pretrained(tmp_path, max_shard_size="150KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (tmp_path / "model.safetensors").exists()
    assert_parity(mistral_model, tmp_path)


def test_llama_tied_embeddings(tmp_path):
    model = llama_tied()
    model.save_pretrained(tmp_path)
    assert_parity(model, tmp_path)


def test_qwen3_qk_norm(tmp_path):
    model = qwen3()
    ids = torch.tensor([prompt(seed=3)])
    with torch.no_grad():  # the q/k norm weights must change the logits, or this test would prove nothing
        plain = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(2)
        assert (model(ids).logits - plain).abs().max() > 1
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.div_(2)
    model.save_pretrained(tmp_path)
    assert Transformer.from_pretrained(tmp_path).args.sliding_window is None
    assert_parity(model, tmp_path)


def test_sliding_window(mistral_model, tmp_path):
    windowed = mistral(sliding_window=24)
    ids = torch.tensor([prompt(seed=3)])
    with torch.no_grad():  # the window must change the logits, or this test would prove nothing
        assert (windowed(ids).logits - mistral_model(ids).logits)[:, 24:].abs().max() > 1
    windowed.save_pretrained(tmp_path)
    assert Transformer.from_pretrained(tmp_path).args.sliding_window == 24
    assert_parity(windowed, tmp_path)


def test_batch_of_different_lengths_matches_each_alone(mistral_model, tmp_path):
    mistral_model.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    prompts = [prompt(seed=10 + i, length=n) for i, n in enumerate([1, 7, 64, 150])]
    params = SamplingParams(max_new_tokens=16)
    together = generate(model, prompts, params).tokens
    alone = [generate(model, [p], params).tokens[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 16 for t in together)
