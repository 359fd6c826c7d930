"""NF4 against bitsandbytes and transformers as oracles.

- quantize: packed bytes, absmax, nested absmax and offset identical to
  bitsandbytes.functional.quantize_4bit(quant_type="nf4") with and without compress_statistics;
  dequantize identical to bitsandbytes.functional.dequantize_4bit.
- a random model quantized on load gives the same logits as transformers + bitsandbytes NF4 on the
  same checkpoint: bitsandbytes runs NF4 on CPU (dequantize, then an fp32 matmul), so this is the
  real oracle, not a dequantized-weights stand-in.
- a checkpoint saved pre-quantized by transformers loads byte for byte.
- memory: the bytes the modules hold equal the formula of docs/memory.md on a scaled config.
"""
import math

import pytest
import torch

from tinytis import nf4, nf4_linear
from tinytis.cache import PagedKVCache, PagePool
from tinytis.config import ModelArgs
from tinytis.errors import UserError
from tinytis.model import Transformer
from tinytis.weights import save_hf

bnb = pytest.importorskip("bitsandbytes.functional")


def make_weight(shape, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "outliers":  # heavy tails and 1 % of values 1000x larger, scaled to fit fp16
        w = w * torch.exp(2 * torch.randn(shape, generator=g))
        w.view(-1)[torch.randperm(w.numel(), generator=g)[: max(1, w.numel() // 100)]] *= 1000
        w = w / w.abs().max() * 6e4
    elif kind == "zero-blocks":  # whole blocks of 64 zeros: absmax 0
        w.view(-1)[: 3 * 64] = 0
    elif kind == "equal-absmax":  # every block's absmax is 1, so absmax - mean is 0: nested absmax 0
        w = w.sign()
    return w.to(dtype)


# (N, K): n multiple of 64 or not (tail block), absmax count a multiple of 256 or not (nested tail)
SHAPES = [(64, 64), (128, 320), (33, 62), (4096, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "outliers", "zero-blocks", "equal-absmax"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_and_dequantize_identical_to_bitsandbytes(shape, dtype, kind, double_quant):
    w = make_weight(shape, dtype, kind, seed=sum(shape) + len(kind))
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q = nf4.quantize(w, double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
    assert torch.equal(nf4.dequantize(q, dtype), bnb.dequantize_4bit(packed, state))


def test_odd_element_count_packs_a_trailing_zero_like_bitsandbytes():
    w = make_weight((3, 5), torch.float32, "normal", seed=1)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = nf4.quantize(w, double_quant=False)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(nf4.dequantize(q), bnb.dequantize_4bit(packed, state))


def test_codebooks_are_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, bnb.create_dynamic_map(signed=True))


def test_nibble_order_first_element_high():
    # every value of a block of 64 is the block max: code 15 -> bytes 0xFF; then a -max, +max pair -> 0x0F
    w = torch.ones(128)
    w[64] = -1.0
    q = nf4.quantize(w, double_quant=False)
    assert q.packed[0].item() == 0xFF and q.packed[32].item() == 0x0F


ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=320, vocab_size=256,
                 max_seq_len=128, rope_theta=10000.0)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    model = Transformer(ARGS)
    model.init_weights(seed=0, std=0.1)
    path = tmp_path_factory.mktemp("dense")
    save_hf(model.state_dict(), path, ARGS)
    return path


def hf_nf4(path, double_quant):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' bitsandbytes integration needs it
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.MistralForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).eval()
    # On a CPU with AVX512-BF16, bitsandbytes' Linear4bit (>= 0.49) repacks its weight at the first eval forward
    # and runs a fused bf16 kernel (activations and absmax rounded to bf16), ignoring compute_dtype=float32.
    # Turn that off so it takes its dequantize + fp32 matmul path: the fp32 oracle this test compares against.
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    return model


IDS = torch.randint(0, ARGS.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_on_load_matches_transformers_bitsandbytes(dense_dir, double_quant, tmp_path):
    hf = hf_nf4(dense_dir, double_quant)
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    if double_quant:
        ours = Transformer.from_pretrained(dense_dir, quant="nf4")
    else:
        ours = nf4_linear.quantize_model(Transformer.from_pretrained(dense_dir), double_quant=False)
    dense = Transformer.from_pretrained(dense_dir)
    with torch.no_grad():
        expected, got, unquantized = hf(IDS).logits, ours(IDS), dense(IDS)
    # same NF4 weights, both fp32 matmuls: equal up to fp32 rounding (observed: exactly equal)
    assert (got - expected).abs().max() <= 1e-5
    assert (unquantized - expected).abs().max() > 1e-2  # quantization is visible at this tolerance

    # the checkpoint transformers saves pre-quantized loads byte for byte and gives the same logits
    hf.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    for name in nf4_linear.block_linear_names(ours):
        a = ours.get_submodule(name.removesuffix(".weight")).weight
        b = loaded.get_submodule(name.removesuffix(".weight")).weight
        assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax) and a.shape == b.shape
        assert b.double_quant == double_quant
        if double_quant:
            assert torch.equal(a.nested_absmax, b.nested_absmax) and torch.equal(a.offset, b.offset)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), got)


def test_quantize_model_equals_quantize_on_load(dense_dir):
    on_load = Transformer.from_pretrained(dense_dir, quant="nf4")
    after = nf4_linear.quantize_model(Transformer.from_pretrained(dense_dir))
    assert nf4_linear.block_linear_names(after) == set()  # no dense Linear left in the blocks
    assert isinstance(after.output, torch.nn.Linear) and not isinstance(after.output, nf4_linear.Linear4bit)
    for (n1, b1), (n2, b2) in zip(on_load.named_buffers(), after.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2)


def test_unknown_quant_is_a_user_error(dense_dir):
    with pytest.raises(UserError, match="nf4"):
        Transformer.from_pretrained(dense_dir, quant="int8")


def test_linear4bit_reference_forward_is_dequantized_matmul():
    w = torch.randn(96, 128)
    layer = nf4_linear.Linear4bit(nf4.quantize(w))
    x = torch.randn(5, 128)
    expected = x.double() @ nf4.dequantize(layer.weight).double().T
    assert (layer(x).double() - expected).abs().max() <= 1e-6 * expected.abs().max()  # fp32 rounding


def nf4_bytes(n_out, n_in, double_quant):
    """docs/memory.md: 1/2 byte per weight; per 64 weights one fp32 absmax, or with double quantization
    one uint8 absmax plus one fp32 per 256 absmax and one fp32 offset."""
    n = n_out * n_in
    blocks = math.ceil(n / 64)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + scales


# a scaled Mistral-7B-v0.3 (docs/memory.md): same ratios (GQA 4, hidden 3.5x dim), 1/16 of the width
SCALED = ModelArgs(dim=256, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=896, vocab_size=1024)


@pytest.mark.parametrize("double_quant", [False, True])
def test_memory_accounting_matches_the_formula(double_quant):
    args = SCALED
    model = Transformer(args)
    nf4_linear.quantize_model(model, double_quant)
    d, kv, hid = args.dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    linears = [(args.n_heads * args.head_dim, d), (kv, d), (kv, d), (d, args.n_heads * args.head_dim),
               (hid, d), (d, hid), (hid, d)]
    per_layer = sum(nf4_bytes(o, i, double_quant) for o, i in linears) + 2 * d * 4  # + two fp32 norms
    expected = args.n_layers * per_layer + 2 * args.vocab_size * d * 4 + d * 4  # embedding, lm_head, final norm
    assert nf4_linear.weight_bytes(model) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_match_the_formula(dtype):
    """docs/memory.md: 2 (K, V) x layers x KV heads x head_dim x bytes per token, in whole pages of 16 slots per
    (layer, sequence, KV head)."""
    args, T, page = SCALED, 40, 16
    elt = torch.tensor([], dtype=dtype).element_size()
    cache = PagedKVCache(args, 1, PagePool(args.head_dim, page, dtype=dtype))
    assert cache.token_bytes == 2 * args.n_layers * args.n_kv_heads * args.head_dim * elt
    cache.begin_forward(torch.arange(T)[None])
    for layer in range(args.n_layers):
        q = torch.randn(1, args.n_heads, T, args.head_dim, dtype=dtype)
        kv = torch.randn(1, args.n_kv_heads, T, args.head_dim, dtype=dtype)
        cache.attend(layer, q, kv, kv)
    per_head = lambda n: math.ceil(n / page) * page * args.head_dim * 2 * elt  # noqa: E731
    assert cache.bytes_held() == args.n_layers * args.n_kv_heads * per_head(T)
    keep = torch.zeros(args.n_layers, 1, args.n_kv_heads, cache.pos.shape[-1], dtype=torch.bool)
    keep[..., :20] = True  # a budget of 50 %: 20 of 40 tokens per head, 2 pages
    cache.compact(keep)
    assert cache.bytes_held() == args.n_layers * args.n_kv_heads * per_head(20)


def test_generate_cli_with_quant_nf4_runs_on_the_embedded_model():
    """Acceptance: greedy generation with --quant nf4 on models/tiny runs end to end on CPU."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "models" / "tiny" / "model.safetensors").exists():
        pytest.skip("the embedded model models/tiny is not trained yet")
    run = subprocess.run([sys.executable, "generate.py", "--quant", "nf4", "--prompt", "The pass key is 1234. The pass key is",
                          "--max-new-tokens", "8"], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[tinytis] prompt tokens" in run.stdout
