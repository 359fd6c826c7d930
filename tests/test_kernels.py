"""Every Triton kernel against its torch reference, and each reference against an independent oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with one they run compiled on CUDA. The
interpreter's tl.dot multiplies bfloat16 operands as their uint16 bit patterns, so bf16 cases of
kernels that use tl.dot (NF4 gemm, paged attention) run on CUDA only; fp16 covers that path here.

Tolerances, relative to the largest reference value (scale) unless stated:
  NF4 matmul   fp32 2^-17 (summation order); fp16 2^-9 and bf16 2^-6: the reference rounds the
               dequantized weights to x's dtype and the gemv kernel does not, plus output rounding.
  RoPE + write fp32 1e-6 absolute (cos/sin of fp32 angles up to 3.2e4 rad); fp16/bf16 one unit in
               the last place of the rounded result (both round the same fp32 value once).
               v is copied bit for bit; slots not written stay bit for bit.
  attention    out: fp32 1e-5, fp16 2^-9 absolute (probabilities are cast to fp16 before p @ v);
               mass: 1e-6 absolute in every dtype (logits accumulate in fp32 in both).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from tinytis import kernels
from tinytis.kernels.nf4_matmul import nf4_matmul_ref, nf4_matmul_triton
from tinytis.kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from tinytis.kernels.rope_cache import rope_cache_write_ref, rope_cache_write_triton
from tinytis import nf4, nf4_linear
from tinytis.cache import Observe, PagedKVCache, PagePool
from tinytis.config import ModelArgs
from tinytis.model import Transformer, apply_rope, rope_cos_sin

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("no GPU and TRITON_INTERPRET unset: run through tests/conftest.py", allow_module_level=True)


def needs_dot(dtype):
    """bf16 through tl.dot is wrong in the interpreter (see module docstring): CUDA only."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton interpreter multiplies bf16 tl.dot operands as uint16")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def nf4_weight(n, k, double_quant, seed):
    w = torch.randn(n, k, generator=gen(seed))
    q = nf4.quantize(w, double_quant)
    return nf4.NF4Weight(q.packed.to(DEVICE), q.absmax.to(DEVICE), q.shape, q.dtype,
                         None if q.nested_absmax is None else q.nested_absmax.to(DEVICE),
                         None if q.offset is None else q.offset.to(DEVICE))


NF4_TOL = {torch.float32: 2**-17, torch.float16: 2**-9, torch.bfloat16: 2**-6}


def assert_matmul_close(y, ref):
    scale = ref.float().abs().max()
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert (y.float() - ref.float()).abs().max() <= NF4_TOL[y.dtype] * scale


# (N, K): N not a multiple of BLOCK_N; K not a multiple of BLOCK_K; 64 absmax per row (a nested
# block of 256 spans rows); K split into slices that do not divide it
@pytest.mark.parametrize("n,k,m,split_k", [(48, 320, 1, 3), (100, 192, 3, 1), (40, 1024, 8, 5), (24, 4096, 2, 2)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_gemv_matches_reference(n, k, m, split_k, double_quant, dtype):
    w = nf4_weight(n, k, double_quant, seed=n + k)
    x = torch.randn(m, k, generator=gen(m)).to(DEVICE, dtype)
    y = nf4_matmul_triton(x, w, split_k=split_k, block_n=32 if m <= 4 else 16, block_k=128)  # the CUDA tiles
    assert_matmul_close(y, nf4_matmul_ref(x, w))


@pytest.mark.parametrize("m", [9, 70])  # the gemm path: M > 8, not a multiple of BLOCK_M
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_gemm_matches_reference(m, double_quant, dtype):
    needs_dot(dtype)
    w = nf4_weight(72, 192, double_quant, seed=m)
    x = torch.randn(2, m, 192, generator=gen(m)).to(DEVICE, dtype)  # leading batch dim is flattened
    y = nf4_matmul_triton(x, w, block_m=64, block_n=64, block_k=64)  # the CUDA tiles
    assert_matmul_close(y, nf4_matmul_ref(x, w))


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of each value of x (in x's dtype), as fp32."""
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).float()


@pytest.mark.parametrize("head_dim", [32, 48])  # 48: half 24 is not a power of 2 (masked lanes)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_cache_write_matches_reference(head_dim, dtype):
    T, H, KV, pages, page_size = 6, 6, 2, 5, 4
    g = gen(head_dim)
    q = torch.randn(T, H, head_dim, generator=g).to(DEVICE, dtype)
    kv_proj = torch.randn(T, 2 * KV, head_dim, generator=g).to(DEVICE, dtype)
    k, v = kv_proj[:, :KV], kv_proj[:, KV:]  # strided views, as split from one projection
    positions = torch.tensor([0, 1, 7, 4095, 32767, -1], device=DEVICE)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)
    slots = torch.randperm(pages * page_size, generator=g)[: T * KV].view(T, KV).to(DEVICE)
    slots[-1] = -1  # a padding token: nothing written
    pools = [torch.randn(pages, page_size, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2)]
    k_ref, v_ref, k_out, v_out = (p.clone() for p in pools * 2)

    q_ref = rope_cache_write_ref(q, k, v, positions, inv_freq, k_ref, v_ref, slots)
    q_out = rope_cache_write_triton(q, k, v, positions, inv_freq, k_out, v_out, slots)
    for got, ref in ((q_out, q_ref), (k_out, k_ref)):
        tol = 1e-6 if dtype == torch.float32 else ulp(ref.abs())
        assert ((got.float() - ref.float()).abs() <= tol).all()
    assert torch.equal(v_out, v_ref)
    written = torch.zeros(pages * page_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    assert torch.equal(k_out.view(-1, head_dim)[~written], pools[0].view(-1, head_dim)[~written])


def test_rope_reference_is_the_models_rope():
    """Oracle for the reference: tinytis.model's RoPE (fp32) on the same positions."""
    T, H, D = 5, 4, 32
    x = torch.randn(T, H, D, generator=gen(3))
    positions = torch.tensor([0, 3, 100, 5000, 32000])
    theta = 1e6
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    pools = [torch.zeros(8, 4, D) for _ in range(2)]
    slots = torch.arange(T * H).view(T, H)
    ours = rope_cache_write_ref(x, x, x, positions, inv_freq, *pools, slots)
    cos, sin = rope_cos_sin(positions[None], D, theta, torch.float32)  # (1, 1, T, D)
    model = apply_rope(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    assert torch.allclose(ours, model, atol=1e-5, rtol=0)
    assert torch.equal(pools[0].view(-1, D)[: T * H], ours.reshape(-1, D))


def paged_case(B, KV, G, D, page_size, lengths, dtype, seed):
    """Random pools and page tables: each (sequence, KV head) gets its own shuffled pages; unused
    table entries are -1."""
    g = gen(seed)
    max_pages = max(-(-n // page_size) for row in lengths for n in row) + 1
    n_pages = B * KV * max_pages + 3
    order = torch.randperm(n_pages, generator=g)
    table = torch.full((B, KV, max_pages), -1, dtype=torch.int32)
    used = 0
    for b in range(B):
        for h in range(KV):
            n = -(-lengths[b][h] // page_size)
            table[b, h, :n] = order[used : used + n]
            used += n
    q = torch.randn(B, KV * G, D, generator=g)
    k_pool = torch.randn(n_pages, page_size, D, generator=g) * 2
    v_pool = torch.randn(n_pages, page_size, D, generator=g)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in (q, k_pool, v_pool, table, lengths)]


ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}

# lengths per (sequence, KV head): ragged, 0, 1, not multiples of the page size or block_t
CASES = [
    dict(B=2, KV=2, G=4, page_size=16, lengths=[[0, 37], [96, 1]], n_splits=3),
    dict(B=1, KV=3, G=1, page_size=8, lengths=[[50, 17, 130]], n_splits=None),
    dict(B=2, KV=1, G=3, page_size=16, lengths=[[200], [63]], n_splits=1),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_attention_matches_reference(case, dtype):
    needs_dot(dtype)
    c = CASES[case]
    D = 32
    q, k_pool, v_pool, table, lengths = paged_case(c["B"], c["KV"], c["G"], D, c["page_size"], c["lengths"], dtype, case)
    scale = D**-0.5
    out, mass = paged_decode_attention_triton(q, k_pool, v_pool, table, lengths, scale, need_mass=True,
                                              n_splits=c["n_splits"], block_t=16)
    out_ref, mass_ref = paged_decode_attention_ref(q, k_pool, v_pool, table, lengths, scale)
    assert out.dtype == q.dtype
    assert (out.float() - out_ref.float()).abs().max() <= ATTN_TOL[dtype]
    assert (mass - mass_ref).abs().max() <= 1e-6
    out_only, no_mass = paged_decode_attention_triton(q, k_pool, v_pool, table, lengths, scale, need_mass=False,
                                                      n_splits=c["n_splits"], block_t=16)
    assert no_mass is None and torch.equal(out_only, out)


def test_paged_reference_is_dense_attention():
    """Oracle for the reference: SDPA over each head's slots gathered into a contiguous K, V."""
    B, KV, G, D, page_size = 2, 2, 3, 16, 4
    lengths = [[9, 4], [1, 12]]
    q, k_pool, v_pool, table, lens = paged_case(B, KV, G, D, page_size, lengths, torch.float32, seed=7)
    out, mass = paged_decode_attention_ref(q, k_pool, v_pool, table, lens, D**-0.5)
    for b in range(B):
        for h in range(KV):
            n = lengths[b][h]
            slots = [int(table[b, h, i // page_size]) * page_size + i % page_size for i in range(n)]
            k = k_pool.reshape(-1, D)[slots]
            v = v_pool.reshape(-1, D)[slots]
            qg = q[b, h * G : (h + 1) * G]  # (G, D)
            expected = F.scaled_dot_product_attention(qg[:, None], k[None], v[None])[:, 0]
            assert torch.allclose(out[b, h * G : (h + 1) * G], expected, atol=1e-6)
            p = torch.softmax(qg @ k.T * D**-0.5, dim=-1)
            assert torch.allclose(mass[b, h, :n], p.mean(0), atol=1e-7)
            assert (mass[b, h, n:] == 0).all()
            assert torch.isclose(mass[b, h].sum(), torch.tensor(1.0))


def tiny_nf4_prefill_and_decode():
    """A tiny NF4 model prefilling a ragged batch into a PagedKVCache (pages of 4), then 3 decode steps:
    the NF4 gemm (prefill), NF4 gemv and paged decode attention with mass (decode). -> (logits per step, mass)."""
    a = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=64)
    model = Transformer(a)
    model.init_weights(0, std=0.1)
    model = nf4_linear.quantize_model(model).to(DEVICE)
    cache = PagedKVCache(a, 2, PagePool(a.head_dim, page_size=4, n_pages=8, device=DEVICE))
    cache.observe = Observe(mass=True)
    ids = torch.arange(22, device=DEVICE).view(2, 11) % 64
    positions = torch.arange(11, device=DEVICE).expand(2, 11).clone()
    positions[1, :3] = -1  # row 1 is left-padded: 8 tokens
    logits = []
    with torch.no_grad():
        logits.append(model(ids, positions, cache))
        for _ in range(3):
            positions = positions[:, -1:] + 1
            logits.append(model(logits[-1][:, -1:].argmax(-1), positions, cache))
    return logits, cache.mass


def test_prefill_and_decode_through_triton_match_torch(monkeypatch):
    """The model and PagedKVCache give the same logits and attention mass through the Triton kernels
    (interpreted on CPU) as through the torch path. Tolerance: fp32 rounding, 1e-5 x the largest logit; mass 1e-6."""
    monkeypatch.setattr(kernels, "BACKEND", "torch")
    ref_logits, ref_mass = tiny_nf4_prefill_and_decode()
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    logits, mass = tiny_nf4_prefill_and_decode()
    for a, b in zip(ref_logits, logits):
        real = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        if a.shape[1] == 11:
            real[1, :3] = False  # padded queries: their outputs are never used
        assert (a[real] - b[real]).abs().max() <= 1e-5 * a[real].abs().max()
    assert ref_mass.shape == mass.shape and ref_mass.sum() > 0
    assert (ref_mass - mass).abs().max() <= 1e-6


def test_backend_is_chosen_from_the_environment(monkeypatch):
    monkeypatch.delenv("TINYTIS_KERNELS", raising=False)
    assert kernels._choose() == ("triton" if torch.cuda.is_available() else "torch")
    for choice in ("torch", "triton"):
        monkeypatch.setenv("TINYTIS_KERNELS", choice)
        assert kernels._choose() == choice
    monkeypatch.setenv("TINYTIS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TINYTIS_KERNELS"):
        kernels._choose()
