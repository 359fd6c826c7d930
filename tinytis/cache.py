"""KV caches. A cache stores each forward chunk's keys and values and runs attention over what it holds.

Interface used by the model:
  begin_forward(positions)           positions (B, T) of the chunk about to run, -1 for padding
  attend(layer, q, k, v, x) -> out   store k, v: (B, KV, T, D) for this layer, attend q: (B, H, T, D) to the cache;
                                     x: (B, T, dim) the layer's normed input, for a cache that records a value per slot
A cache with takes_rope = True (PagedKVCache) gets q and k before RoPE and the chunk's tinytis.model.Rope as a
sixth argument, and rotates them itself: on the kernel path fused with the page write.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from tinytis import kernels
from tinytis.config import ModelArgs
from tinytis.model import attend, attention_mask


class DenseKVCache:
    """Contiguous K and V of shape (n_layers, B, KV, max_len, D); the baseline every other cache is checked against."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.args = args
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)  # -1: empty or padding
        self.length = 0

    def begin_forward(self, positions):
        T = positions.shape[1]
        if self.length + T > self.pos.shape[1]:
            raise ValueError(f"cache holds {self.pos.shape[1]} tokens, {self.length + T} requested")
        self.start, self.length = self.length, self.length + T
        self.pos[:, self.start : self.length] = positions
        self.mask = attention_mask(positions, self.pos[:, : self.length], self.args.sliding_window, self.k.dtype)

    def decide(self, layer, logits):
        """DMS eviction logits (tinytis.dms): a dense cache keeps every token."""

    def attend(self, layer, q, k, v, x=None):
        self.k[layer, :, :, self.start : self.length] = k
        self.v[layer, :, :, self.start : self.length] = v
        return attend(q, self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length], self.mask)

    def bytes_held(self) -> int:
        """Bytes of K and V for the tokens stored (padding excluded)."""
        a = self.args
        return int((self.pos >= 0).sum()) * a.n_layers * a.n_kv_heads * a.head_dim * 2 * self.k.element_size()


class PagePool:
    """Fixed-size pages of K and V rows shared by every layer, KV head and sequence of the caches that use it.

    A page holds page_size consecutive slots (rows of head_dim) of one (layer, sequence, KV head); the page
    tables of PagedKVCache say which. The pool only keeps the free pages, on a stack, and grows when it runs out.
    """

    def __init__(self, head_dim: int, page_size: int = 16, n_pages: int = 256, dtype=torch.float32, device="cpu"):
        self.page_size = page_size
        self.k = torch.zeros(n_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.free_ids = torch.arange(n_pages - 1, -1, -1, device=device)  # free_ids[:n_free]; the next page handed out is last
        self.n_free = n_pages
        self.peak_used = 0

    @property
    def n_pages(self) -> int:
        return self.k.shape[0]

    @property
    def used(self) -> int:
        return self.n_pages - self.n_free

    @property
    def page_bytes(self) -> int:
        """Bytes of K and V in one page."""
        return 2 * self.k[0].numel() * self.k.element_size()

    def rows(self, which: str) -> torch.Tensor:
        """K or V as (n_pages * page_size, head_dim): slot s of page p is row p * page_size + s."""
        return (self.k if which == "k" else self.v).view(-1, self.k.shape[-1])

    def alloc(self, n: int) -> torch.Tensor:
        """n page ids (long tensor) taken off the free stack."""
        if n > self.n_free:
            self._grow(n - self.n_free)
        self.n_free -= n
        self.peak_used = max(self.peak_used, self.used)
        return self.free_ids[self.n_free : self.n_free + n].clone()

    def free(self, ids: torch.Tensor):
        self.free_ids[self.n_free : self.n_free + len(ids)] = ids
        self.n_free += len(ids)

    def _grow(self, extra: int):
        old = self.n_pages
        new = max(2 * old, old + extra)
        self.k = torch.cat([self.k, self.k.new_zeros(new - old, *self.k.shape[1:])])
        self.v = torch.cat([self.v, self.v.new_zeros(new - old, *self.v.shape[1:])])
        added = torch.arange(new - 1, old - 1, -1, device=self.k.device)
        self.free_ids = torch.cat([added, self.free_ids[: self.n_free], self.free_ids.new_empty(old - self.n_free)])
        self.n_free += new - old


@dataclass
class Observe:
    """Attention statistics a PagedKVCache records for the eviction policy while it runs attention."""

    mass: bool = False  # add the attention each query puts on a slot to that slot's mass, mean over the GQA group
    window: torch.Tensor | None = None  # (B,): per query head, the attention of each row's last window[b] queries
    dms_window: int | None = None  # record DMS decisions; a key decided "evict" is masked beyond this distance
    slot_value: Callable | None = None  # (layer, x (B, T, dim)) -> (B, KV, T): stored with each slot as it is written

    def per_slot(self) -> "Observe":
        """What goes on being recorded for every new slot (DMS decisions, slot values) once the attention
        statistics stop: after a fork, or after the oracle's reference answer."""
        return Observe(dms_window=self.dms_window, slot_value=self.slot_value)


class PagedKVCache:
    """K and V in pages of a PagePool, with a page table per (layer, sequence, KV head), so heads hold different tokens.

    State, stacked over layers L, sequences B (rows of the batch) and KV heads:
      table   (L, B, KV, P)            page ids, -1 unused; a head holds exactly its first ceil(length / page_size)
      length  (L, B, KV)               slots in use; slot s is row s % page_size of page table[s // page_size]
      pos     (L, B, KV, P * ps)       original position of each slot, -1 when unused; strictly increasing along slots
      mass    (L, B, KV, P * ps)       attention each slot has received (Observe.mass)
      window  (L, B, KV, P * ps, G)    attention from the latest forward's window queries, per query head (Observe.window)
      evict   (L, B, KV, P * ps)       DMS decided to evict the slot once it leaves the window (Observe.dms_window)
      slot_value (L, B, KV, P * ps)    computed from the layer's input when the slot was written (Observe.slot_value)
    Keys are stored after RoPE at their true positions and never renumbered. Padding (position -1) is never stored.
    """

    takes_rope = True  # the model hands q and k unrotated, with the chunk's Rope (see attend)

    def __init__(self, args: ModelArgs, batch_size: int, pool: PagePool):
        self.args, self.pool = args, pool
        L, B, KV, G = args.n_layers, batch_size, args.n_kv_heads, args.n_heads // args.n_kv_heads
        device = pool.k.device
        acc = torch.promote_types(pool.k.dtype, torch.float32)  # accumulators are at least fp32
        self.table = torch.full((L, B, KV, 0), -1, dtype=torch.long, device=device)
        self.length = torch.zeros(L, B, KV, dtype=torch.long, device=device)
        self.pos = torch.full((L, B, KV, 0), -1, dtype=torch.long, device=device)
        self.mass = torch.zeros(L, B, KV, 0, dtype=acc, device=device)
        self.window = torch.zeros(L, B, KV, 0, G, dtype=acc, device=device)
        self.evict = torch.zeros(L, B, KV, 0, dtype=torch.bool, device=device)
        self.slot_value = torch.zeros(L, B, KV, 0, dtype=acc, device=device)
        self.observe = Observe()
        self.gathered = pool.k.new_empty(2, 0, args.head_dim)  # K and V rows gathered for attention, reused (_gather)
        self.slot_rows = None  # pool row of every slot, while the page tables stay as they are (_slot_rows)

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V that one token takes in a full cache (every layer and KV head)."""
        a = self.args
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * self.pool.k.element_size()

    def pages_held(self) -> int:
        return int((self.table >= 0).sum())

    def bytes_held(self) -> int:
        """Bytes of the pages this cache holds: what eviction gives back is exactly what leaves this number."""
        return self.pages_held() * self.pool.page_bytes

    # -- forward ---------------------------------------------------------------------------------------------------

    def begin_forward(self, positions: torch.Tensor):
        """Make room for a chunk: positions (B, T), -1 for padding, which must come before a row's tokens; a row's
        positions increase and come after every position it holds.

        Where the chunk's keys go, which pool rows each layer reads and whether it needs an attention mask are worked
        out here once for all layers, so that a layer's attend() is a write, a gather and the attention.
        """
        T = positions.shape[1]
        real = positions >= 0
        padded = not bool(real.all())
        n_new = real.sum(1)
        rank = torch.arange(T, device=positions.device) - (T - n_new)[:, None]  # (B, T) index among the row's new tokens
        if padded and not torch.equal(rank >= 0, real):
            raise ValueError("padding (position -1) must come before the tokens of each row")
        self.q_pos, self.past_len = positions, self.length  # (B, T), (L, B, KV) before this chunk
        new_len = self.length + n_new[None, :, None]
        self._alloc_pages(new_len)
        slot = torch.where(real[None, :, None], self.length[..., None] + rank[None, :, None], -1)  # (L, B, KV, T)
        l, b, h, t = (slot >= 0).nonzero(as_tuple=True)
        self.pos[l, b, h, slot[l, b, h, t]] = positions[b, t]
        self.write_slot, self.length = slot, new_len
        self.new = slot[0] >= 0  # (B, KV, T) the chunk's real tokens, the same in every layer
        slot_rows = self._slot_rows()
        write_rows = slot_rows.gather(-1, slot.clamp(min=0))  # (L, B, KV, T) pool row of each new key
        self.k_rows, self.v_rows = self.pool.rows("k"), self.pool.rows("v")
        if self.observe.window is not None:
            self.window.zero_()
        obs = self.observe
        # one token per row on the kernel backend: the kernels write and read the pages (_decode_kernel)
        self.kernel_decode = (T == 1 and kernels.use_triton(positions) and obs.window is None
                              and obs.dms_window is None and self.args.sliding_window is None)
        if self.kernel_decode:
            self.write_rows = torch.where(slot >= 0, write_rows, -1)[..., 0].unbind(0)  # per layer (B, KV), -1: padded row
            return
        self.write_rows = write_rows[:, self.new].unbind(0)  # per layer (N,)
        self.self_visible = self.self_mask = None
        self.attends_to_past = bool(self.past_len.any())
        S, ragged = T, [False] * len(slot)
        if self.attends_to_past:  # the held slots of each head, gathered right-aligned into S key columns
            S = int(new_len.max())
            col = torch.arange(S, device=slot.device) - (S - new_len)[..., None]  # (L, B, KV, S) slot; < 0: none there
            held = col >= 0
            col = col.clamp(min=0)
            self.read_rows = slot_rows.gather(-1, col).unbind(0)  # per layer (B, KV, S)
            self.key_slot = torch.where(held, col, -1).unbind(0)
            self.key_pos = torch.where(held, self.pos.gather(-1, col), -1).unbind(0)
            n_keys = new_len.amax((1, 2))  # (L,) key columns of each layer: the last n_keys[layer] of the S
            ragged = (new_len < n_keys[:, None, None]).flatten(1).any(1).tolist()  # a head holds fewer: masked columns
            self.n_keys = n_keys.tolist()
        self.causal = torch.ones(T, S, dtype=torch.bool, device=slot.device).tril(S - T)  # queries = the last T columns
        # plain[layer]: each query sees exactly the keys up to its own column, which attend() does without a mask
        plain = not padded and self.args.sliding_window is None and self.observe.dms_window is None
        self.plain = [plain and not r for r in ragged]
        self.counted, self.first_counted = self._counted_queries()

    def decide(self, layer: int, logits):
        """DMS: logits (B, KV, T) of this chunk's tokens; the logit of token t decides about token t - 1 (tinytis.dms),
        which is the slot before t's in every head (DMS evicts nothing inside its window)."""
        if self.observe.dms_window is None:
            return
        prev = self.write_slot[layer] - 1  # (B, KV, T)
        pos = self.pos[layer].gather(-1, prev.clamp(min=0))
        b, h, t = ((prev >= 0) & (pos == self.q_pos[:, None, :] - 1)).nonzero(as_tuple=True)
        self.evict[layer][b, h, prev[b, h, t]] = logits[b, h, t] > 0

    def _evicted(self, layer: int, key_slot):
        """DMS decisions of keys at key_slot (B, KV, Tk), -1 for none: (B, KV, Tk) bool."""
        return self.evict[layer].gather(-1, key_slot.clamp(min=0)) & (key_slot >= 0)

    def attend(self, layer: int, q, k, v, x=None, rope=None):
        """Write the chunk's k, v: (B, KV, T, D) into this layer's pages, then attend q: (B, H, T, D) to what it holds.
        x: (B, T, dim), the layer's normed input, from which Observe.slot_value computes each new slot's value.
        rope: the chunk's tinytis.model.Rope when q and k come unrotated (from the model); None when already rotated.

        Held slots are gathered right-aligned, so without eviction the keys line up exactly as in DenseKVCache
        (left padding first) and the result is bit-identical to it.

        On the kernel backend (kernels.use_triton) a decode step (T = 1) runs two kernels per layer: the fused RoPE +
        page write, then the paged decode attention (with the attention mass only when the policy records it).
        Elsewhere, a chunk whose queries each see exactly the keys up to their own (self.plain: no padding, no head
        holding fewer keys, no window or DMS) runs causal SDPA without a mask (FlashAttention on CUDA).
        """
        B, H, T, D = q.shape
        KV = k.shape[1]
        new = self.new
        if self.observe.slot_value is not None:
            b, h, _ = new.nonzero(as_tuple=True)
            self.slot_value[layer][b, h, self.write_slot[layer][new]] = self.observe.slot_value(layer, x)[new].to(self.slot_value.dtype)
        dms = self.observe.dms_window is not None
        if self.kernel_decode:
            return self._decode_kernel(layer, q, k, v, rope)
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        self.k_rows.index_copy_(0, self.write_rows[layer], k[new])
        self.v_rows.index_copy_(0, self.write_rows[layer], v[new])
        if self.attends_to_past:
            S = self.n_keys[layer]
            cols = slice(self.causal.shape[1] - S, None)  # this layer's key columns
            keys, values = self._gather(self.read_rows[layer][..., cols], (B, KV, S, D))
        else:  # nothing held before: the chunk attends to itself, as in the dense cache
            cols = slice(None)
            keys, values = k, v
        if self.plain[layer]:
            visible, mask = self.causal[None, None, :, cols], None
        elif self.attends_to_past or dms:  # DMS decisions differ by layer and head
            evicted = self._evicted(layer, self._key_slot(layer, cols)) if dms else None
            visible = self._visible(self._key_pos(layer, cols), evicted)  # (B, KV or 1, T, S)
            mask = self._mask(visible, H, q.dtype)
        else:
            if self.self_mask is None:  # the same in every layer
                self.self_visible = self._visible(self._key_pos(layer, cols))  # (B, 1, T, T)
                self.self_mask = self._mask(self.self_visible, H, q.dtype)
            visible, mask = self.self_visible, self.self_mask
        out = attend(q, keys, values, mask)
        if self.counted is not None:
            self._observe(layer, q, keys, visible, self._key_slot(layer, cols))
        return out

    def _key_slot(self, layer, cols):
        """The slot of each key column of this layer's attention, (B, KV, S), -1 where the head holds none."""
        return self.key_slot[layer][..., cols] if self.attends_to_past else self.write_slot[layer]

    def _key_pos(self, layer, cols):
        """The position of each key column, (B, KV or 1, S), -1 where the head holds none."""
        return self.key_pos[layer][..., cols] if self.attends_to_past else self.q_pos[:, None]

    def _gather(self, rows, shape):
        """K and V at pool rows (B, KV, S) as shape (B, KV, S, D), gathered into buffers that every layer and forward
        reuse, so that a decode step allocates no memory the size of the cache."""
        n = rows.numel()
        if self.gathered.shape[1] < n:
            self.gathered = self.k_rows.new_empty(2, max(n, 2 * self.gathered.shape[1]), shape[-1])
        rows = rows.reshape(-1)
        keys = torch.index_select(self.k_rows, 0, rows, out=self.gathered[0, :n])
        values = torch.index_select(self.v_rows, 0, rows, out=self.gathered[1, :n])
        return keys.view(shape), values.view(shape)

    def _decode_kernel(self, layer: int, q, k, v, rope):
        """One token per row, q: (B, H, 1, D) and k, v: (B, KV, 1, D): the fused RoPE + page write, then the paged
        decode attention, which also returns the mass each slot got when the policy records it. rope None: q and k
        come rotated (a DMS model rotates its own), so they are written as they are."""
        rows = self.write_rows[layer]  # (B, KV) pool row of each new key, -1 for a padded row
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if rope is None:
            new = rows >= 0
            self.k_rows[rows[new]], self.v_rows[rows[new]] = k[new], v[new]
        else:
            q = kernels.rope_cache_write(q, k, v, rope.positions[:, 0], rope.inv_freq, self.pool.k, self.pool.v, rows)
        out, mass = kernels.paged_decode_attention(q, self.pool.k, self.pool.v, self.table[layer],
                                                   self.length[layer], q.shape[-1] ** -0.5, self.observe.mass)
        if mass is not None:
            self.mass[layer] += mass * (self.q_pos >= 0)[:, :, None]  # q_pos (B, 1); a padded row's query counts for nothing
        return out[:, :, None]

    def _visible(self, key_pos, evicted=None):
        """Which keys each query of the chunk sees: key_pos (B, X, Tk) -> bool (B, X, T, Tk). A real query sees the
        held keys not after it (within the sliding window; for DMS, evicted (B, X, Tk) keys only within its window);
        a padded query sees every key, so no softmax row is empty, and its output is never used."""
        q, k = self.q_pos[:, None, :, None], key_pos[:, :, None, :]
        visible = (k <= q) & (k >= 0)
        if self.args.sliding_window is not None:
            visible &= q - k < self.args.sliding_window
        if evicted is not None:
            visible = visible & (~evicted[:, :, None, :] | (q - k <= self.observe.dms_window))
        return visible | (q < 0)

    @staticmethod
    def _mask(visible, n_heads: int, dtype):
        """The additive mask SDPA takes: 0 where visible (B, 1 or KV, T, S), -inf elsewhere: (B, 1 or n_heads, T, S)."""
        if visible.shape[1] > 1:
            visible = visible.repeat_interleave(n_heads // visible.shape[1], dim=1)
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))

    def _slot_rows(self) -> torch.Tensor:
        """Pool row of every slot, (L, B, KV, P * ps), row 0 past a head's pages: kept until the page tables change."""
        if self.slot_rows is None:
            ps = self.pool.page_size
            rows = self.table.clamp(min=0)[..., None] * ps + torch.arange(ps, device=self.table.device)
            self.slot_rows = rows.flatten(-2)
        return self.slot_rows

    def _rows(self, table, slot):
        """Pool rows of slots: table (..., P), slot (..., N) -> (..., N); slots past a head's pages give row 0."""
        ps = self.pool.page_size
        return (table.gather(-1, slot // ps) * ps + slot % ps).clamp(min=0)

    def _alloc_pages(self, new_len):
        """Give every head the pages it needs to hold new_len (L, B, KV) slots."""
        ps = self.pool.page_size
        held = (self.length + ps - 1) // ps
        extra = ((new_len + ps - 1) // ps - held).flatten()
        total = int(extra.sum())
        if total == 0:
            return
        self._widen(int(((new_len + ps - 1) // ps).max()))
        self.slot_rows = None
        ids = self.pool.alloc(total)
        head = torch.repeat_interleave(torch.arange(extra.numel(), device=ids.device), extra)  # (total,) head of each page
        first = torch.cumsum(extra, 0) - extra
        col = held.flatten()[head] + torch.arange(total, device=ids.device) - first[head]
        self.table.view(-1, self.table.shape[-1])[head, col] = ids

    def _widen(self, n_pages: int):
        extra = n_pages - self.table.shape[-1]
        if extra <= 0:
            return
        slots = extra * self.pool.page_size
        cat = lambda x, n, fill: torch.cat([x, x.new_full((*x.shape[:3], n, *x.shape[4:]), fill)], dim=3)
        self.table, self.pos = cat(self.table, extra, -1), cat(self.pos, slots, -1)
        self.mass, self.window = cat(self.mass, slots, 0), cat(self.window, slots, 0)
        self.evict = cat(self.evict, slots, False)
        self.slot_value = cat(self.slot_value, slots, 0)

    def _counted_queries(self):
        """Which queries of the chunk each statistic in self.observe counts: (B, 1, 1, C, T) as 0/1, C = the mass
        (every real query) and/or the window (each row's last window[b] real queries), or None; and the first query
        that counts for any."""
        obs, real = self.observe, self.q_pos >= 0  # (B, T)
        counted = [real] if obs.mass else []
        if obs.window is not None:
            counted.append(real & (real.flip(1).cumsum(1).flip(1) <= obs.window[:, None].to(real.device)))
        if not counted:
            return None, 0
        first = 0 if obs.mass else real.shape[1] - int(counted[-1].sum(1).max())
        return torch.stack(counted, 1).to(self.mass.dtype)[:, None, None], first

    def _observe(self, layer, q, keys, visible, key_slot):
        """Record what self.observe asks for from this layer's attention probabilities, a block of queries at a time.
        visible: (B, KV or 1, T, Tk); key_slot: (B, KV, Tk) the slot of each key, -1 for none."""
        B, H, T, D = q.shape
        KV, Tk = keys.shape[1], keys.shape[2]
        G = H // KV
        counted = self.counted  # (B, 1, 1, C, T)
        summed = counted.new_zeros(B, KV, G, counted.shape[3], Tk)  # attention summed over the queries counted
        block = max(1, 2**24 // (B * H * Tk))
        for t0 in range(self.first_counted, T, block):
            t1 = min(T, t0 + block)
            n = Tk - (T - t1)  # keys are in position order and the last T - t1 are after every real query of the block
            qb = (q[:, :, t0:t1] * D**-0.5).reshape(B, KV, G * (t1 - t0), D).to(summed.dtype)
            logits = (qb @ keys[:, :, :n].to(summed.dtype).transpose(-1, -2)).view(B, KV, G, t1 - t0, n)
            probs = logits.masked_fill_(~visible[:, :, None, t0:t1, :n], float("-inf")).softmax(-1)
            summed[..., :n] += counted[..., t0:t1] @ probs  # (B, KV, G, C, n)
        summed.masked_fill_((key_slot < 0)[:, :, None, None], 0)
        idx = key_slot.clamp(min=0)
        if self.observe.mass:
            self.mass[layer].scatter_add_(-1, idx, summed[:, :, :, 0].mean(2))
        if self.observe.window is not None:
            self.window[layer].scatter_add_(2, idx[..., None].expand(-1, -1, -1, G), summed[:, :, :, -1].transpose(2, 3))

    # -- eviction and bookkeeping ----------------------------------------------------------------------------------

    def compact(self, keep: torch.Tensor):
        """Keep the slots where keep (L, B, KV, S) is True, in position order, and return emptied pages to the pool."""
        ps = self.pool.page_size
        S = keep.shape[-1]
        keep = keep & (torch.arange(S, device=keep.device) < self.length[..., None])
        l, b, h, old = keep.nonzero(as_tuple=True)  # row-major: within a head, slots ascend
        new = (keep.cumsum(-1) - 1)[l, b, h, old]
        src = self.table[l, b, h, old // ps] * ps + old % ps
        dst = self.table[l, b, h, new // ps] * ps + new % ps
        moved = src != dst
        for which in ("k", "v"):
            rows = self.pool.rows(which)
            rows[dst[moved]] = rows[src[moved]]
        for name, fill in (("pos", -1), ("mass", 0), ("window", 0), ("evict", False), ("slot_value", 0)):
            x = getattr(self, name)
            y = torch.full_like(x, fill)
            y[l, b, h, new] = x[l, b, h, old]
            setattr(self, name, y)
        self.length = keep.sum(-1)
        self._free_pages_past((self.length + ps - 1) // ps)

    def _free_pages_past(self, n_pages):
        """Return every page at or past column n_pages (L, B, KV) of each head's table, then trim the tables."""
        col = torch.arange(self.table.shape[-1], device=self.table.device)
        gone = (col >= n_pages[..., None]) & (self.table >= 0)
        self.slot_rows = None
        self.pool.free(self.table[gone])
        self.table[gone] = -1
        P = int(n_pages.max()) if n_pages.numel() else 0
        slots = P * self.pool.page_size
        self.table = self.table[..., :P].contiguous()
        self.pos, self.mass = self.pos[..., :slots].contiguous(), self.mass[..., :slots].contiguous()
        self.window = self.window[..., :slots, :].contiguous()
        self.evict = self.evict[..., :slots].contiguous()
        self.slot_value = self.slot_value[..., :slots].contiguous()

    def truncate(self, limit: torch.Tensor):
        """Drop every slot whose position is >= limit[b] (B,), e.g. the reference answer after an oracle pass."""
        self.compact((self.pos >= 0) & (self.pos < limit[None, :, None, None]))

    def free(self, rows: list[int]):
        """Return every page of these sequences to the pool; the rows are empty again and may start a new sequence."""
        n_pages = (self.length + self.pool.page_size - 1) // self.pool.page_size
        n_pages[:, rows] = 0
        self.length[:, rows] = 0
        self.pos[:, rows] = -1
        self.mass[:, rows] = 0
        self.window[:, rows] = 0
        self.evict[:, rows] = False
        self.slot_value[:, rows] = 0
        self._free_pages_past(n_pages)

    def fork(self) -> "PagedKVCache":
        """A copy of this cache on the same pool, with its own pages (a copy of every page held)."""
        other = PagedKVCache(self.args, self.length.shape[1], self.pool)
        held = self.table >= 0
        ids = self.pool.alloc(int(held.sum()))
        self.pool.k[ids], self.pool.v[ids] = self.pool.k[self.table[held]], self.pool.v[self.table[held]]
        other.table = self.table.clone()
        other.table[held] = ids
        other.length, other.pos, other.mass, other.window, other.evict, other.slot_value = (
            x.clone() for x in (self.length, self.pos, self.mass, self.window, self.evict, self.slot_value))
        other.observe = self.observe.per_slot()  # its own statistics start afresh
        return other

    def keys(self, b: int, n_slots: int) -> torch.Tensor:
        """Cached keys of sequence b, slots 0..n_slots-1 of every (layer, KV head): (L, KV, n_slots, D)."""
        L, _, KV, _ = self.table.shape
        slot = torch.arange(n_slots, device=self.table.device).expand(L, KV, n_slots)
        return self.pool.rows("k")[self._rows(self.table[:, b], slot)]
