"""Fused RoPE + paged KV-cache write.

For T new tokens (all sequences of a batch flattened): q (T, H, D), k and v (T, KV, D) straight from
the projections, and positions (T,). q and k are rotated by halves (i, i + D/2) at each token's
position, in fp32 with one rounding to the storage dtype; the rotated k and v are written to slot
slots[t, kv] of the layer's pools k_pool and v_pool (n_pages, page_size, D), slot = page * page_size
+ offset in the page. A negative slot writes nothing (padding). The rotated q is returned.

Per-(token, KV head) slots let the heads of one layer hold different numbers of tokens, as the
per-(layer, KV head) page tables of the cache require.
"""
import torch

from tinytis.kernels._triton import tl, triton


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated in fp32 with cos, sin (T, 1, D/2); returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_cache_write_ref(q, k, v, positions, inv_freq, k_pool, v_pool, slots):
    """Torch reference. inv_freq: fp32 (D/2,); slots: int (T, KV). Writes k_pool, v_pool; returns rotated q."""
    angles = positions.float()[:, None, None] * inv_freq  # (T, 1, D/2)
    cos, sin = angles.cos(), angles.sin()
    q_rot, k_rot = _rotate_halves(q, cos, sin), _rotate_halves(k, cos, sin)
    keep = slots >= 0  # (T, KV)
    D = k.shape[-1]
    k_pool.view(-1, D)[slots[keep]] = k_rot[keep].to(k_pool.dtype)
    v_pool.view(-1, D)[slots[keep]] = v[keep].to(v_pool.dtype)
    return q_rot


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, k_pool_ptr, v_pool_ptr, slots_ptr, q_out_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, H, KV, HALF,
                       BLOCK: tl.constexpr):
    """grid (T, H + KV): program (t, h) rotates query head h, or for h >= H writes KV head h - H of token t."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=mask, other=0.0)
    cos, sin = tl.cos(angle), tl.sin(angle)
    if h < H:
        src = q_ptr + t * stride_qt + h * stride_qh
        x1 = tl.load(src + i, mask=mask).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=mask).to(tl.float32)
        dst = q_out_ptr + (t * H + h) * 2 * HALF
        tl.store(dst + i, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + i, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        kv = h - H
        slot = tl.load(slots_ptr + t * KV + kv).to(tl.int64)
        if slot >= 0:
            src = k_ptr + t * stride_kt + kv * stride_kh
            x1 = tl.load(src + i, mask=mask).to(tl.float32)
            x2 = tl.load(src + HALF + i, mask=mask).to(tl.float32)
            dst = k_pool_ptr + slot * 2 * HALF
            tl.store(dst + i, (x1 * cos - x2 * sin).to(k_pool_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + i, (x2 * cos + x1 * sin).to(k_pool_ptr.dtype.element_ty), mask=mask)
            src = v_ptr + t * stride_vt + kv * stride_vh
            dst = v_pool_ptr + slot * 2 * HALF
            tl.store(dst + i, tl.load(src + i, mask=mask).to(v_pool_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + i, tl.load(src + HALF + i, mask=mask).to(v_pool_ptr.dtype.element_ty), mask=mask)


def rope_cache_write_triton(q, k, v, positions, inv_freq, k_pool, v_pool, slots):
    """Triton version of rope_cache_write_ref; q, k, v may be strided views with a contiguous last dim."""
    T, H, D = q.shape
    KV = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k_pool.is_contiguous() and v_pool.is_contiguous()
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    _rope_cache_kernel[(T, H + KV)](
        q, k, v, positions.contiguous(), inv_freq.float().contiguous(), k_pool, v_pool, slots.contiguous(), q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), H, KV, D // 2,
        BLOCK=triton.next_power_of_2(D // 2),
    )
    return q_out
