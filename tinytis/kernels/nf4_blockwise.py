"""NF4 matmuls that never hold the whole weight dense: the CPU path of kernels.nf4_matmul, and the backward of any.

- decode (at most 8 rows of x, CPU, K % 64 == 0): nf4_cpu's gemv reads the 4-bit weight once and dequantizes each
  block of 64 on the stack.
- otherwise: CHUNK_WEIGHTS of the weight at a time (whole rows) are dequantized into one buffer reused across the
  call, and each chunk is multiplied by a torch matmul. The dequantizer is nf4_cpu's on CPU when K % 64 == 0, else
  nf4.dequantize_rows.

Values: each weight is dequantized exactly as nf4.dequantize(w, x.dtype) does (so as bitsandbytes does), then the
products are summed in fp32 and the result rounded once to x's dtype. This equals kernels.nf4_matmul_ref (dequantize
to x.dtype, then F.linear) up to the order of the fp32 sums: in fp32 a few units of 2^-24 relative to sum |x w|; in
bf16/fp16, where F.linear on CPU also sums in fp32, the same before the final rounding, so at most one unit in the last
place of the result.
"""
import torch

from tinytis import nf4
from tinytis.kernels import nf4_cpu

CHUNK_WEIGHTS = 1 << 20  # weights dequantized at a time: a 4 MiB fp32 buffer


def _use_c(t: torch.Tensor, w) -> bool:
    return t.device.type == "cpu" and w.shape[1] % 64 == 0 and nf4_cpu.library() is not None


def row_chunks(w, dtype: torch.dtype, device: torch.device):
    """Yield (start, rows start:stop of dequantize(w, dtype)) over the whole weight, CHUNK_WEIGHTS at a time. On the
    C path the rows are fp32 views of one buffer that the next chunk overwrites."""
    N, K = w.shape
    rows = max(1, CHUNK_WEIGHTS // K)
    c = _use_c(w.packed, w)
    buffer = torch.empty(min(rows, N), K, device=device) if c else None
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        if c:
            nf4_cpu.dequantize_rows_into(w, start, buffer[: stop - start], dtype)
            yield start, buffer[: stop - start]
        else:
            yield start, nf4.dequantize_rows(w, start, stop, dtype).float()


@torch.no_grad()  # the C kernels and the reused buffer are invisible to autograd: nf4_linear.NF4Matmul differentiates
def nf4_matmul_blockwise(x: torch.Tensor, w) -> torch.Tensor:
    """y = x @ dequantize(w, x.dtype).T for x (..., K) -> (..., N) in x.dtype."""
    N, K = w.shape
    x2 = x.reshape(-1, K).float().contiguous()  # (M, K)
    if x2.shape[0] <= nf4_cpu.MAX_M and _use_c(x, w):
        y = nf4_cpu.gemv(x2, w, x.dtype)
    else:
        y = torch.empty(x2.shape[0], N, device=x.device)
        for start, rows in row_chunks(w, x.dtype, x.device):
            y[:, start : start + rows.shape[0]] = x2 @ rows.T
    return y.to(x.dtype).view(*x.shape[:-1], N)


@torch.no_grad()
def nf4_matmul_grad_input(grad: torch.Tensor, w) -> torch.Tensor:
    """grad_input = grad @ dequantize(w, grad.dtype) for grad (..., N) -> (..., K) in grad.dtype: the input gradient
    of y = x @ W.T, the weight dequantized again chunk by chunk rather than kept from the forward."""
    N, K = w.shape
    g2 = grad.reshape(-1, N).float()  # (M, N)
    out = torch.zeros(g2.shape[0], K, device=grad.device)
    for start, rows in row_chunks(w, grad.dtype, grad.device):
        out.addmm_(g2[:, start : start + rows.shape[0]], rows)
    return out.to(grad.dtype).view(*grad.shape[:-1], K)
