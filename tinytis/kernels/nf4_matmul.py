"""Fused NF4 dequantize + matmul: y = x @ W.T for x (M, K) and W (N, K) in the bitsandbytes NF4 format.

W is never materialized: each program reads a (BLOCK_N, BLOCK_K) tile of packed codes (half a byte
per weight) and its absmax values, dequantizes it in registers and multiplies.

- gemv path (decode, M <= 8): a program dequantizes its W tile once and applies it to all M rows of
  x. K is split over SPLIT_K programs whose fp32 partial sums are atomically added into the output
  (GemLite's split-K gemv pattern), so even a 4096 x 1024 matrix gives enough programs to fill the
  GPU and the weight is streamed at close to memory bandwidth.
- gemm path (prefill): a tiled matmul whose W tile is dequantized, cast to x's dtype, then tl.dot.

Dequantization of element (n, k), i = n * K + k (K a multiple of 64, so blocks do not cross rows):
    code  = high nibble of packed[i // 2] if k is even, else the low nibble
    scale = absmax[i // 64], or, double-quantized,
            DYNAMIC_CODE[absmax_u8[i // 64]] * nested_absmax[i // (64 * 256)] + offset
    w     = NF4_CODE[code] * scale
"""
import torch
import torch.nn.functional as F

from tinytis.kernels._triton import tl, triton
from tinytis import nf4

GEMV_MAX_M = 8


def nf4_matmul_ref(x: torch.Tensor, w) -> torch.Tensor:
    """Torch reference: dequantize W to x's dtype, then F.linear (what bitsandbytes does off GPU). The other paths are
    tested against it; off Triton, kernels.nf4_matmul runs nf4_blockwise's path, which holds no dense W."""
    return F.linear(x, nf4.dequantize(w, x.dtype))


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, byte_values_ptr, dyn_code_ptr, rows, k0, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """W[rows, k0 : k0 + BLOCK_K] as fp32 (BLOCK_N, BLOCK_K); 0 outside W. rows: (BLOCK_N,) int64."""
    # (BLOCK_N, BLOCK_K // 2) bytes; each decodes to its two values, high nibble first, with one
    # 8-byte load from the 256 x 2 table nf4.BYTE_VALUES (half the lookups of a 16-entry table)
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte_mask = (rows[:, None] < N) & (kb[None, :] < K // 2)
    byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + kb[None, :], mask=byte_mask, other=0).to(tl.int32)
    w = tl.load(byte_values_ptr + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])  # (BLOCK_N, BLOCK_K // 2, 2)

    # one scale per 64 weights: (BLOCK_N, BLOCK_K // 64)
    kblk = k0 // 64 + tl.arange(0, BLOCK_K // 64)
    blk_mask = (rows[:, None] < N) & (kblk[None, :] < K // 64)
    blk = rows[:, None] * (K // 64) + kblk[None, :]
    if DOUBLE_QUANT:
        a = tl.load(absmax_ptr + blk, mask=blk_mask, other=0).to(tl.int32)
        scale = tl.load(dyn_code_ptr + a) * tl.load(nested_ptr + blk // 256, mask=blk_mask, other=0.0) + tl.load(offset_ptr)
        scale = tl.where(blk_mask, scale, 0.0)
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_mask, other=0.0)
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 64, 64)) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, byte_values_ptr, dyn_code_ptr, out_ptr,
                 M, N, K, K_PER_SPLIT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """out[:M, n-tile] += x[:M, k-split] @ W[n-tile, k-split].T; grid (cdiv(N, BLOCK_N), SPLIT_K)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k_start = tl.program_id(1) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w = _dequant_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, byte_values_ptr, dyn_code_ptr, rows, k0, N, K,
                          BLOCK_N, BLOCK_K, DOUBLE_QUANT)  # (BLOCK_N, BLOCK_K)
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < k_end), other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N)
    mask = (m[:, None] < M) & (rows[None, :] < N)
    tl.atomic_add(out_ptr + m[:, None] * N + rows[None, :], acc, mask=mask)


@triton.jit
def _gemm_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, byte_values_ptr, dyn_code_ptr, out_ptr,
                 M, N, K,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 PRECISION: tl.constexpr):
    """out[m-tile, n-tile] = x[m-tile] @ W[n-tile].T; grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = _dequant_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, byte_values_ptr, dyn_code_ptr, rows, k0, N, K,
                          BLOCK_N, BLOCK_K, DOUBLE_QUANT)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    mask = (m[:, None] < M) & (rows[None, :] < N)
    tl.store(out_ptr + m[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _code_tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """nf4.BYTE_VALUES (256, 2) and nf4.DYNAMIC_CODE (256,) on device, copied once."""
    if device not in _CODE_TABLES:
        _CODE_TABLES[device] = (nf4.BYTE_VALUES.to(device), nf4.DYNAMIC_CODE.to(device))
    return _CODE_TABLES[device]


_CODE_TABLES = {}


def nf4_matmul_triton(x: torch.Tensor, w, split_k: int | None = None, block_m: int | None = None,
                      block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Triton y = x @ W.T: x (..., K) -> (..., N) in x.dtype. K must be a multiple of 64.

    Block sizes are set, not autotuned (untuned on hardware so far). gemv: the (M, BLOCK_N, BLOCK_K)
    product tile holds 8192 values whatever M; split_k (default: about 4 programs per SM) slices K.
    gemm: 64 x 64 x 64 tiles. In the interpreter (CPU tensors), whose cost is per program rather than per value,
    the defaults are few large programs: W tiles of up to 512 x 512 (and 128 rows of x). Block sizes given are
    used as given (the tests pass the CUDA ones).
    """
    N, K = w.shape
    assert K % 64 == 0 and x.shape[-1] == K, f"nf4_matmul_triton needs K % 64 == 0 and x (..., {K}), got {tuple(x.shape)}"
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    byte_values, dyn_code = _code_tables(x.device)
    double = w.nested_absmax is not None
    # without double quantization the kernel never reads nested_absmax and offset
    nested, offset = (w.nested_absmax, w.offset) if double else (w.absmax, w.absmax)
    if M <= GEMV_MAX_M:
        block_m = triton.next_power_of_2(M)
        if x.is_cuda:
            block_n = block_n or (32 if block_m <= 4 else 16)
            block_k = min(block_k or max(64, min(256, 8192 // (block_m * block_n))), triton.next_power_of_2(K))
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = split_k or max(1, min(triton.cdiv(4 * sms, triton.cdiv(N, block_n)), K // block_k))
        else:  # the interpreter
            block_n = block_n or min(512, triton.next_power_of_2(N))
            block_k = min(block_k or 512, triton.next_power_of_2(K))
            split_k = split_k or 1
        k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_split))
        _gemv_kernel[grid](x2, w.packed, w.absmax, nested, offset, byte_values, dyn_code, out, M, N, K, k_per_split,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOUBLE_QUANT=double)
        return out.to(x.dtype).view(*x.shape[:-1], N)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if x.is_cuda:
        block_m, block_n, block_k = block_m or 64, block_n or 64, block_k or 64
    else:  # the interpreter
        block_m = block_m or min(128, triton.next_power_of_2(M))
        block_n = block_n or min(512, triton.next_power_of_2(N))
        block_k = block_k or min(512, triton.next_power_of_2(K))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _gemm_kernel[grid](x2, w.packed, w.absmax, nested, offset, byte_values, dyn_code, out, M, N, K,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOUBLE_QUANT=double,
                       PRECISION="ieee" if x.dtype == torch.float32 else None)
    return out.view(*x.shape[:-1], N)
