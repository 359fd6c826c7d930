"""Decode attention over per-(sequence, KV head) page tables, emitting the attention mass of each slot.

Inputs, for one layer and one new query token per sequence:
  q           (B, H, D)                    H = KV * G query heads, G per KV head (GQA group)
  k_pool      (n_pages, page_size, D)      the layer's K pages (after RoPE); v_pool likewise
  page_table  (B, KV, max_pages) int       pages of each (sequence, KV head), in slot order
  lengths     (B, KV) int                  slots held by each (sequence, KV head); heads may differ
Outputs:
  out         (B, H, D) in q's dtype       softmax(q k^T * scale) v over the held slots
  mass        (B, KV, max_pages * page_size) fp32, or None: the probability each slot received,
              averaged over the G query heads of its group (what H2O and TOVA accumulate); 0 past
              the length.

Triton version, split-K (flash-decoding) in two stages:
  stage 1, grid (B, KV, n_splits): one program per group of G query heads sharing a KV head and one
    slice of its slots; online softmax over the slice -> unnormalized partial output, running max m
    and sum l per query head; with need_mass also the raw logits of every slot.
  stage 2, grid (B, KV, n_splits): the global log-sum-exp per query head from all slices' (m, l);
    the slice-0 program merges the partial outputs; every program turns the logits of its slice into
    probabilities exp(s - M) / L and averages them over the group.
"""
import math

import torch

from tinytis.kernels._triton import tl, triton


def paged_decode_attention_ref(q, k_pool, v_pool, page_table, lengths, scale, need_mass=True):
    """Torch reference (fp32 math): gather each head's slots, softmax, weighted sum."""
    B, H, D = q.shape
    KV, page_size = page_table.shape[1], k_pool.shape[1]
    G = H // KV
    offsets = torch.arange(page_size, device=q.device)
    slots = (page_table.long().clamp(min=0)[..., None] * page_size + offsets).flatten(2)  # (B, KV, S)
    k = k_pool.reshape(-1, D)[slots].float()  # (B, KV, S, D)
    v = v_pool.reshape(-1, D)[slots].float()
    held = torch.arange(slots.shape[-1], device=q.device) < lengths[..., None]  # (B, KV, S)
    logits = torch.einsum("bkgd,bksd->bkgs", q.view(B, KV, G, D).float(), k) * scale
    p = logits.masked_fill(~held[:, :, None], -math.inf).softmax(dim=-1).nan_to_num(0.0)  # empty heads: 0
    out = torch.einsum("bkgs,bksd->bkgd", p, v).reshape(B, H, D).to(q.dtype)
    return out, p.mean(dim=2) if need_mass else None


@triton.jit
def _split_kernel(q_ptr, k_pool_ptr, v_pool_ptr, table_ptr, len_ptr, acc_ptr, ml_ptr, logits_ptr,
                  scale, KV, G, MAX_PAGES, S, SPLIT,
                  PAGE: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                  NEED_MASS: tl.constexpr, PRECISION: tl.constexpr):
    """Stage 1: program (b, kv, s) attends the G query heads of KV head kv to slots [s*SPLIT, (s+1)*SPLIT)."""
    b, kv, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_splits = tl.num_programs(2)
    head = b * KV + kv  # index of this (sequence, KV head)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (head * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)  # (BLOCK_G, D)
    length = tl.load(len_ptr + head)
    start = s * SPLIT
    end = tl.minimum(start + SPLIT, length)

    m = tl.full((BLOCK_G,), -float("inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        held = t < end
        page = tl.load(table_ptr + head * MAX_PAGES + t // PAGE, mask=held, other=0).to(tl.int64)
        slot = page * PAGE + t % PAGE
        k = tl.load(k_pool_ptr + slot[:, None] * D + d[None, :], mask=held[:, None], other=0.0)  # (BLOCK_T, D)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_T)
        logits = tl.where(held[None, :], logits, -float("inf"))
        if NEED_MASS:
            tl.store(logits_ptr + (head * G + g[:, None]) * S + t[None, :], logits, mask=(g[:, None] < G) & held[None, :])
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        v = tl.load(v_pool_ptr + slot[:, None] * D + d[None, :], mask=held[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    row = (head * G + g) * n_splits + s  # per (query head, split)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
    tl.store(ml_ptr + row * 2, m, mask=g < G)
    tl.store(ml_ptr + row * 2 + 1, l, mask=g < G)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, logits_ptr, len_ptr, out_ptr, mass_ptr, KV, G, S, SPLIT,
                  D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
                  NEED_MASS: tl.constexpr):
    """Stage 2: global max M and sum L per query head; slice 0 merges the output; each slice writes its mass."""
    b, kv, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_splits = tl.num_programs(2)
    head = b * KV + kv
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_S)
    row = (head * G + g[:, None]) * n_splits + j[None, :]  # (BLOCK_G, BLOCK_S)
    valid = (g[:, None] < G) & (j[None, :] < n_splits)
    m = tl.load(ml_ptr + row * 2, mask=valid, other=-float("inf"))
    l = tl.load(ml_ptr + row * 2 + 1, mask=valid, other=0.0)
    M = tl.max(m, axis=1)  # (BLOCK_G,); -inf for a head holding nothing
    M_safe = tl.where(M == -float("inf"), 0.0, M)
    weight = tl.where(m == -float("inf"), 0.0, tl.exp(m - M_safe[:, None]))  # (BLOCK_G, BLOCK_S)
    L = tl.sum(l * weight, axis=1)
    L_safe = tl.where(L > 0, L, 1.0)
    if s == 0:
        d = tl.arange(0, D)
        out = tl.zeros((BLOCK_G, D), dtype=tl.float32)
        for i in range(0, n_splits):
            row_i = (head * G + g) * n_splits + i  # (BLOCK_G,)
            m_i = tl.load(ml_ptr + row_i * 2, mask=g < G, other=-float("inf"))
            w_i = tl.where(m_i == -float("inf"), 0.0, tl.exp(m_i - M_safe))  # weight of slice i
            part = tl.load(acc_ptr + row_i[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)
            out += part * w_i[:, None]
        out = out / L_safe[:, None]
        tl.store(out_ptr + (head * G + g[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)
    if NEED_MASS:
        length = tl.load(len_ptr + head)
        end = tl.minimum(s * SPLIT + SPLIT, length)
        for t0 in range(s * SPLIT, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            held = t < end
            logits = tl.load(logits_ptr + (head * G + g[:, None]) * S + t[None, :],
                             mask=(g[:, None] < G) & held[None, :], other=-float("inf"))
            p = tl.exp(logits - M_safe[:, None]) / L_safe[:, None]  # (BLOCK_G, BLOCK_T), 0 for padded heads
            tl.store(mass_ptr + head * S + t, tl.sum(p, axis=0) / G, mask=held)


def paged_decode_attention_triton(q, k_pool, v_pool, page_table, lengths, scale, need_mass=True,
                                  n_splits: int | None = None, block_t: int = 64):
    """Triton version of paged_decode_attention_ref. D must be a power of 2 (>= 16).

    n_splits: slices of the slot range per head (default: about 4 programs per SM, at most one per
    block_t slots). Chosen from the table's capacity, not the lengths, so no host sync is needed.
    """
    B, H, D = q.shape
    KV, max_pages = page_table.shape[1], page_table.shape[2]
    page_size = k_pool.shape[1]
    G, S = H // KV, max_pages * page_size
    assert D >= 16 and D & (D - 1) == 0, f"head_dim {D} must be a power of 2 >= 16"
    if n_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        n_splits = max(1, min(triton.cdiv(4 * sms, B * KV), triton.cdiv(S, block_t)))
    split = triton.cdiv(triton.cdiv(S, n_splits), block_t) * block_t
    n_splits = triton.cdiv(S, split)
    f32 = dict(dtype=torch.float32, device=q.device)
    acc = torch.empty(B * H * n_splits, D, **f32)
    ml = torch.empty(B * H * n_splits, 2, **f32)
    logits = torch.empty(B * H, S, **f32) if need_mass else acc  # acc: a placeholder never read
    mass = torch.zeros(B, KV, S, **f32) if need_mass else acc
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    q, table, lens = q.contiguous(), page_table.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous()
    block_g = max(16, triton.next_power_of_2(G))
    precision = "ieee" if q.dtype == torch.float32 else None
    grid = (B, KV, n_splits)
    _split_kernel[grid](q, k_pool, v_pool, table, lens, acc, ml, logits, scale, KV, G, max_pages, S, split,
                        PAGE=page_size, D=D, BLOCK_G=block_g, BLOCK_T=block_t, NEED_MASS=need_mass, PRECISION=precision)
    _merge_kernel[grid](acc, ml, logits, lens, out, mass, KV, G, S, split,
                        D=D, BLOCK_G=block_g, BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_T=block_t,
                        NEED_MASS=need_mass)
    return out, mass if need_mass else None
