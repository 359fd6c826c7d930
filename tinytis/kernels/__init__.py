"""Kernel dispatch, chosen once at import: Triton on CUDA, the torch paths everywhere else.

The NF4 matmul off Triton is nf4_blockwise's (a C gemv on CPU for decode, blockwise dequantize + torch matmul
otherwise), never the whole weight dense; nf4_matmul_ref (dequantize, then F.linear) is what it is tested against.
nf4_matmul_grad_input, the backward of an NF4 Linear, is nf4_blockwise's on every device.

TINYTIS_KERNELS=torch|triton overrides the choice. Triton kernels run on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported (how the tests check them).
Each kernel module holds its Triton kernel and its torch reference side by side.

CALLS counts the Triton launches by kernel (nf4_gemv, nf4_gemm, rope_cache_write, paged_decode_attention): a
debug counter that the tests and bench.py gpu read to see which kernels a decode step runs. The torch path
counts nothing.
"""
import os
from collections import Counter

import torch

from tinytis.kernels._triton import AVAILABLE as TRITON_AVAILABLE
from tinytis.kernels import nf4_blockwise
from tinytis.kernels.nf4_matmul import GEMV_MAX_M, nf4_matmul_triton
from tinytis.kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from tinytis.kernels.rope_cache import rope_cache_write_ref, rope_cache_write_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _choose() -> str:
    choice = os.environ.get("TINYTIS_KERNELS")
    if choice is None:
        return "triton" if TRITON_AVAILABLE and torch.cuda.is_available() else "torch"
    if choice not in ("torch", "triton"):
        raise ValueError(f"TINYTIS_KERNELS={choice!r}: expected 'torch' or 'triton'")
    if choice == "triton" and not TRITON_AVAILABLE:
        raise ValueError("TINYTIS_KERNELS=triton but triton is not installed (pip install triton, or the gpu extra)")
    return choice


BACKEND = _choose()
CALLS = Counter()


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on tensor t goes to Triton: backend triton and t on CUDA (or the interpreter on)."""
    return BACKEND == "triton" and (t.is_cuda or INTERPRET)


def nf4_matmul(x, w):
    """y = x @ dequantize(w).T for x (..., K) and an NF4Weight w (N, K) -> (..., N) in x.dtype."""
    if use_triton(x) and w.shape[1] % 64 == 0:
        CALLS["nf4_gemv" if x.numel() // x.shape[-1] <= GEMV_MAX_M else "nf4_gemm"] += 1
        return nf4_matmul_triton(x, w)
    return nf4_blockwise.nf4_matmul_blockwise(x, w)


def nf4_matmul_grad_input(grad, w):
    """grad @ dequantize(w) for grad (..., N) -> (..., K): nf4_matmul's input gradient, on every device through
    nf4_blockwise (the weight dequantized again, a chunk of rows at a time)."""
    return nf4_blockwise.nf4_matmul_grad_input(grad, w)


def rope_cache_write(q, k, v, positions, inv_freq, k_pool, v_pool, slots):
    """RoPE on q and k at their positions, k and v written into their pool slots; returns rotated q."""
    if not use_triton(q):
        return rope_cache_write_ref(q, k, v, positions, inv_freq, k_pool, v_pool, slots)
    CALLS["rope_cache_write"] += 1
    return rope_cache_write_triton(q, k, v, positions, inv_freq, k_pool, v_pool, slots)


def paged_decode_attention(q, k_pool, v_pool, page_table, lengths, scale, need_mass=True):
    """One query per sequence over per-(sequence, KV head) page tables -> (out, mass or None)."""
    if not use_triton(q):
        return paged_decode_attention_ref(q, k_pool, v_pool, page_table, lengths, scale, need_mass)
    CALLS["paged_decode_attention"] += 1
    return paged_decode_attention_triton(q, k_pool, v_pool, page_table, lengths, scale, need_mass)
