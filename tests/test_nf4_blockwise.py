"""The blockwise NF4 matmul (kernels.nf4_blockwise: the CPU path of kernels.nf4_matmul, the C gemv for decode) and the
backward of the NF4 Linear (nf4_linear.NF4Matmul).

Oracles: nf4.dequantize (byte-identical to bitsandbytes, tests/test_nf4.py) for the dequantized weights, which the C
kernels must reproduce bit for bit; a float64 matmul on those weights for the products; bitsandbytes' matmul_4bit on
CPU.

The products are not bit-identical to nf4_matmul_ref (dequantize to x's dtype, then F.linear): the weights are, but
the fp32 sums run in another order. Tolerance, per element, the bound that holds for any order of summation:
    |y - exact| <= K * 2^-24 * sum_k |x_k w_k|  +  ulp(exact) in x's dtype (its final rounding; 0 in fp32)
nf4_matmul_ref is held to the same bound alongside, so the test says both are equally close to the exact result.
"""
import pytest
import torch
import torch.nn.functional as F

from tinytis import nf4, nf4_linear
from tinytis.kernels import nf4_blockwise, nf4_cpu
from tinytis.kernels.nf4_matmul import nf4_matmul_ref
from saved_bytes import saved_bytes

HAS_C = nf4_cpu.library() is not None


def weight(n, k, double_quant, seed, dtype=torch.float32):
    """Heavy-tailed weights with one all-zero block (absmax 0), quantized."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, k, generator=g))
    w.view(-1)[64:128] = 0
    return nf4.quantize(w.to(dtype), double_quant)


def ulp(t: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).double().abs()


def assert_within_summation_bound(y, x, w):
    """y against x @ dequantize(w, x.dtype).T computed in float64 (see the module docstring)."""
    dense = nf4.dequantize(w, x.dtype).double()
    x64 = x.reshape(-1, w.shape[1]).double()
    exact, magnitude = x64 @ dense.T, x64.abs() @ dense.abs().T
    rounding = ulp(exact.to(x.dtype)) if x.dtype != torch.float32 else 0
    bound = w.shape[1] * 2**-24 * magnitude + rounding
    err = (y.reshape(exact.shape).double() - exact).abs()
    assert y.dtype == x.dtype and (err <= bound).all(), (err - bound).max().item()


@pytest.fixture(params=["c", "torch"])
def path(request, monkeypatch):
    """Run a test with the C kernels, and again with the torch path that stands in for them without a compiler."""
    if request.param == "c" and not HAS_C:
        pytest.skip("no C compiler: the CPU NF4 kernels did not build")
    if request.param == "torch":
        monkeypatch.setattr(nf4_cpu, "library", lambda: None)
    return request.param


@pytest.mark.parametrize("shape,start,stop", [((33, 62), 5, 17), ((64, 64), 0, 64), ((128, 320), 3, 4),
                                              ((7, 96), 1, 7)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_rows_is_the_slice_of_dequantize(shape, start, stop, double_quant):
    w = weight(*shape, double_quant, seed=shape[1])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(nf4.dequantize_rows(w, start, stop, dtype), nf4.dequantize(w, dtype)[start:stop])


# (N, K), K % 64 == 0: 4096 x 64 has 4096 blocks, 16 nested blocks of 256 that straddle rows
@pytest.mark.skipif(not HAS_C, reason="no C compiler")
@pytest.mark.parametrize("shape,start,stop", [((64, 64), 0, 64), ((128, 320), 37, 101), ((4096, 64), 1000, 3001)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_dequantizer_is_bit_identical_to_dequantize(shape, start, stop, double_quant, dtype):
    w = weight(*shape, double_quant, seed=sum(shape), dtype=dtype)
    out = torch.full((stop - start, shape[1]), float("nan"))
    nf4_cpu.dequantize_rows_into(w, start, out, dtype)
    assert torch.equal(out, nf4.dequantize(w, dtype)[start:stop].float())


# M <= 8: the C gemv; M > 8 (and every M on the torch path): chunks of rows; (33, 62): K % 64 != 0, the torch path
@pytest.mark.parametrize("shape", [(96, 128), (300, 1024), (33, 62)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 70])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blockwise_matmul_is_within_the_summation_bound(path, shape, m, double_quant, dtype, monkeypatch):
    monkeypatch.setattr(nf4_blockwise, "CHUNK_WEIGHTS", 40 * shape[1])  # 40 rows a chunk: several, the last short
    w = weight(*shape, double_quant, seed=m + shape[0])
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    assert_within_summation_bound(nf4_blockwise.nf4_matmul_blockwise(x, w), x, w)
    assert_within_summation_bound(nf4_matmul_ref(x, w), x, w)


def test_no_call_dequantizes_more_than_a_chunk(path, monkeypatch):
    """The weight is never dense as a whole: decode dequantizes nothing outside the gemv; prefill and the backward
    dequantize CHUNK_WEIGHTS at a time."""
    monkeypatch.setattr(nf4_blockwise, "CHUNK_WEIGHTS", 16 * 128)
    monkeypatch.setattr(nf4, "dequantize", None)  # any whole-weight dequantization fails
    rows = []  # rows dequantized by each call
    dequantize_rows, dequantize_rows_into = nf4.dequantize_rows, nf4_cpu.dequantize_rows_into
    monkeypatch.setattr(nf4, "dequantize_rows", lambda w, start, stop, dtype: rows.append(stop - start)
                        or dequantize_rows(w, start, stop, dtype))
    monkeypatch.setattr(nf4_cpu, "dequantize_rows_into", lambda w, start, out, dtype: rows.append(out.shape[0])
                        or dequantize_rows_into(w, start, out, dtype))
    w = weight(96, 128, True, seed=0)
    x = torch.randn(40, 128, requires_grad=True)
    nf4_blockwise.nf4_matmul_blockwise(x[:1].detach(), w)
    assert rows == ([] if path == "c" else [16] * 6)
    rows.clear()
    nf4_linear.Linear4bit(w)(x).sum().backward()
    assert rows == [16] * 12  # 6 chunks of 16 rows in the forward, 6 in the backward


def test_matches_bitsandbytes_matmul_4bit_on_cpu():
    """The same NF4 weight (bitsandbytes' bytes) multiplied by bitsandbytes on CPU (it dequantizes, then runs torch's
    fp32 matmul): equal within the bound, doubled since both sums are reordered."""
    bnb = pytest.importorskip("bitsandbytes")
    dense = torch.randn(200, 512, generator=torch.Generator().manual_seed(3))
    packed, state = bnb.functional.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = nf4.NF4Weight(packed.view(-1), state.absmax, dense.shape, dense.dtype, state.state2.absmax, state.offset)
    for m in (1, 5, 40):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
        theirs, ours = bnb.matmul_4bit(x, packed.t(), quant_state=state), nf4_blockwise.nf4_matmul_blockwise(x, w)
        magnitude = x.double().abs() @ nf4.dequantize(w).double().abs().T
        assert ((ours.double() - theirs.double()).abs() <= 2 * 512 * 2**-24 * magnitude).all()


@pytest.mark.parametrize("shape", [(96, 128), (40, 62)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_backward_gives_the_dense_reference_gradient(path, shape, double_quant):
    """Acceptance (issue 25): grad_input of the NF4 Linear equals that of F.linear on the dequantized weight within
    1e-5 (fp32)."""
    w = weight(*shape, double_quant, seed=7)
    layer = nf4_linear.Linear4bit(w)
    x = torch.randn(2, 9, shape[1], generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad = torch.randn(2, 9, shape[0], generator=torch.Generator().manual_seed(2))
    layer(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, nf4.dequantize(w)).backward(grad)
    assert (x.grad - x_ref.grad).abs().max() <= 1e-5


def test_backward_keeps_only_the_4bit_weight():
    w = weight(256, 512, True, seed=0)
    layer = nf4_linear.Linear4bit(w)
    x = torch.randn(4, 512, requires_grad=True)
    assert saved_bytes(lambda: layer(x)) == w.nbytes()  # packed codes, uint8 absmax, nested absmax, offset
    # what F.linear on the dequantized weight keeps: the dense weight (and x), 8 times the NF4 bytes and more
    assert saved_bytes(lambda: F.linear(x, nf4.dequantize(w))) >= 256 * 512 * 4 > 7 * w.nbytes()


def test_backward_in_bf16_is_within_the_summation_bound(path):
    w = weight(96, 128, True, seed=5, dtype=torch.bfloat16)
    x = torch.randn(6, 128, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(6, 96, dtype=torch.bfloat16)
    nf4_linear.Linear4bit(w)(x).backward(grad)
    # grad_input = grad @ W: a sum over N = 96 terms
    exact = grad.double() @ nf4.dequantize(w, torch.bfloat16).double()
    magnitude = grad.double().abs() @ nf4.dequantize(w, torch.bfloat16).double().abs()
    bound = 96 * 2**-24 * magnitude + ulp(exact.to(torch.bfloat16))
    assert x.grad.dtype == torch.bfloat16 and ((x.grad.double() - exact).abs() <= bound).all()
