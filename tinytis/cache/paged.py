"""PagedKVCache: a forward through the page tables. begin_forward works out, once for all layers, where the chunk's
keys go, what each layer reads and whether its attention needs a mask; attend writes the pages, appends to (or
rebuilds) the held view and attends to it."""
import torch

from tinytis import kernels
from tinytis.cache.attention import Observe, additive_mask, attention_received, query_weights, visible_keys
from tinytis.cache.pool import PagePool
from tinytis.cache.tables import PageTables
from tinytis.cache.view import HeldKV
from tinytis.config import ModelArgs
from tinytis.model import attend


class PagedKVCache(PageTables):
    """K and V in pages of a PagePool, with a page table per (layer, sequence, KV head) (tinytis.cache.tables), so
    heads hold different tokens. Keys are stored after RoPE at their true positions and never renumbered. Padding
    (position -1) is never stored."""

    takes_rope = True  # the model hands q and k unrotated, with the chunk's Rope (see attend)

    def __init__(self, args: ModelArgs, batch_size: int, pool: PagePool):
        super().__init__(args, batch_size, pool)
        self.observe = Observe()
        self.held = HeldKV()  # a contiguous copy of what each head holds, for attention (tinytis.cache.view)

    def compact(self, keep: torch.Tensor):
        super().compact(keep)  # (truncate compacts too)
        self.held.invalidate()

    def free(self, rows: list[int]):
        super().free(rows)
        self.held.invalidate()

    def fork(self) -> "PagedKVCache":
        """A copy of this cache on the same pool, with its own pages (a copy of every page held)."""
        other = super().fork()
        other.observe = self.observe.per_slot()  # its own statistics start afresh
        return other

    def begin_forward(self, positions: torch.Tensor):
        """Make room for a chunk: positions (B, T), -1 for padding, which must come before a row's tokens; a row's
        positions increase and come after every position it holds.

        Where the chunk's keys go, what each layer reads and whether it needs an attention mask are worked out here
        once for all layers, so that a layer's attend() is a write, an append to (or a rebuild of) the held view and
        the attention.
        """
        T = positions.shape[1]
        self.padded = not bool((positions >= 0).all())
        self.q_pos, self.past_len = positions, self.length  # (B, T), (L, B, KV) before this chunk
        slot, self.length = self._place(positions)
        self.write_slot = slot
        self.new = slot[0] >= 0  # (B, KV, T) the chunk's real tokens, the same in every layer
        slot_rows = self._slot_rows()
        write_rows = slot_rows.gather(-1, slot.clamp(min=0))  # (L, B, KV, T) pool row of each new key
        self.k_rows, self.v_rows = self.pool.rows("k"), self.pool.rows("v")
        obs = self.observe
        if obs.window is not None:
            self.window.zero_()
        # one token per row on the kernel backend: the kernels write and read the pages (_decode_kernel)
        self.kernel_decode = (T == 1 and kernels.use_triton(positions) and obs.window is None
                              and obs.dms_window is None and self.args.sliding_window is None)
        if self.kernel_decode:
            self.held.invalidate()
            self.write_rows = torch.where(slot >= 0, write_rows, -1)[..., 0].unbind(0)  # per layer (B, KV), -1: padded row
            return
        # per layer (N,) in the order of k[new]
        self.write_rows = (write_rows[:, self.new] if self.padded else write_rows.flatten(1)).unbind(0)
        self.self_visible = self.self_mask = self.causal = None
        self.attends_to_past = bool(self.past_len.any())
        self._plan_reads(slot_rows)
        self.weights, self.first_weighted = query_weights(obs, positions, self.window.shape[-1], self.mass.dtype)
        self.ragged = self.held.ragged if self.attends_to_past else [False] * len(slot)
        if any(self.ragged) and (self.weights is not None or obs.dms_window is not None):
            S = self.held.end
            col = torch.arange(S, device=slot.device) - (S - self.length)[..., None]
            self.key_slot = torch.where(col >= 0, col, -1).unbind(0)  # per layer (B, KV, S)
        # plain[layer]: each query sees exactly the keys up to its own column, which attend() does without a mask
        plain = not self.padded and self.args.sliding_window is None and obs.dms_window is None
        self.plain = [plain and not r for r in self.ragged]

    def _plan_reads(self, slot_rows):
        """What attention reads: each head's held slots, right-aligned into the key columns of the held view. When
        every head gained the chunk's T slots and the view is valid they are appended to it; otherwise read_rows
        says which pool row each key column is rebuilt from, a layer at a time in attend()."""
        self.read_rows = None
        if not self.attends_to_past:
            return
        if self.held.valid and not self.padded:
            self.held.append(self.q_pos)
            return
        S = int(self.length.max())
        col = torch.arange(S, device=slot_rows.device) - (S - self.length)[..., None]  # (L, B, KV, S) slot; < 0: none
        held = col >= 0
        col = col.clamp(min=0)
        self.read_rows = slot_rows.gather(-1, col).unbind(0)  # per layer (B, KV, S)
        self.held.reset(torch.where(held, self.pos.gather(-1, col), -1), self.length, self.pool.k)

    def _place(self, positions):
        """Give the chunk's tokens, positions (B, T), their slots: each row's real tokens follow the slots its heads
        hold, in every layer and head. Allocates the pages they need and records their positions; returns the slots
        (L, B, KV, T), -1 for padding, and the new lengths (L, B, KV)."""
        T = positions.shape[1]
        if not self.padded:  # every head gains T slots
            new_len = self.length + T
            self._alloc_pages(new_len)
            slot = self.length[..., None] + torch.arange(T, device=positions.device)
            self.pos.scatter_(-1, slot, positions[None, :, None].expand_as(slot))
            return slot, new_len
        real = positions >= 0
        n_new = real.sum(1)
        rank = torch.arange(T, device=positions.device) - (T - n_new)[:, None]  # (B, T) index among the row's new tokens
        if not torch.equal(rank >= 0, real):
            raise ValueError("padding (position -1) must come before the tokens of each row")
        new_len = self.length + n_new[None, :, None]
        self._alloc_pages(new_len)
        slot = torch.where(real[None, :, None], self.length[..., None] + rank[None, :, None], -1)
        l, b, h, t = (slot >= 0).nonzero(as_tuple=True)
        self.pos[l, b, h, slot[l, b, h, t]] = positions[b, t]
        return slot, new_len

    def decide(self, layer: int, logits):
        """DMS: logits (B, KV, T) of this chunk's tokens; the logit of token t decides about token t - 1 (tinytis.dms),
        which is the slot before t's in every head (DMS evicts nothing inside its window)."""
        if self.observe.dms_window is None:
            return
        prev = self.write_slot[layer] - 1  # (B, KV, T)
        pos = self.pos[layer].gather(-1, prev.clamp(min=0))
        b, h, t = ((prev >= 0) & (pos == self.q_pos[:, None, :] - 1)).nonzero(as_tuple=True)
        self.evict[layer][b, h, prev[b, h, t]] = logits[b, h, t] > 0

    def _evicted(self, layer: int, key_slot, S: int):
        """DMS decisions of the S keys at key_slot (B, KV, S), -1 for none, or None for slots 0..S-1: (B, KV, S) bool."""
        if key_slot is None:
            return self.evict[layer][..., :S]
        return self.evict[layer].gather(-1, key_slot.clamp(min=0)) & (key_slot >= 0)

    def attend(self, layer: int, q, k, v, x=None, rope=None):
        """Write the chunk's k, v: (B, KV, T, D) into this layer's pages, then attend q: (B, H, T, D) to what it holds.
        x: (B, T, dim), the layer's normed input, from which Observe.slot_value computes each new slot's value.
        rope: the chunk's tinytis.model.Rope when q and k come unrotated (from the model); None when already rotated.

        Attention reads the held view (HeldKV), which lines each head's slots up right-aligned, so without eviction
        the keys sit exactly where DenseKVCache has them (left padding first) and an fp32 result is bit-identical to
        it (a bf16 model attends to the past in fp32: see HeldKV).

        On the kernel backend (kernels.use_triton) a decode step (T = 1) runs two kernels per layer: the fused RoPE +
        page write, then the paged decode attention (with the attention mass only when the policy records it).
        Elsewhere, a chunk whose queries each see exactly the keys up to their own (self.plain: no padding, no head
        holding fewer keys, no window or DMS) runs causal SDPA without a mask (FlashAttention on CUDA).
        """
        H, D = q.shape[1], q.shape[3]
        new = self.new
        if self.observe.slot_value is not None:
            b, h, _ = new.nonzero(as_tuple=True)
            self.slot_value[layer][b, h, self.write_slot[layer][new]] = self.observe.slot_value(layer, x)[new].to(self.slot_value.dtype)
        dms = self.observe.dms_window is not None
        if self.kernel_decode:
            return self._decode_kernel(layer, q, k, v, rope)
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        self.k_rows.index_copy_(0, self.write_rows[layer], k[new] if self.padded else k.reshape(-1, D))
        self.v_rows.index_copy_(0, self.write_rows[layer], v[new] if self.padded else v.reshape(-1, D))
        keys, values = self._keys_values(layer, k, v)
        S = keys.shape[2]
        if self.plain[layer]:
            visible, mask = None, None
        elif self.attends_to_past or dms:  # DMS decisions differ by layer and head
            evicted = self._evicted(layer, self._key_slot(layer, S), S) if dms else None
            visible = self._visible(self._key_pos(layer), evicted)  # (B, KV or 1, T, S)
            mask = additive_mask(visible, H, keys.dtype)
        else:
            if self.self_mask is None:  # the same in every layer
                self.self_visible = self._visible(self._key_pos(layer))  # (B, 1, T, T)
                self.self_mask = additive_mask(self.self_visible, H, q.dtype)
            visible, mask = self.self_visible, self.self_mask
        out = attend(q.to(keys.dtype), keys, values, mask).to(q.dtype)  # the held view is at least fp32 (HeldKV)
        if self.weights is not None:
            if visible is None and q.shape[2] > 1:  # plain: the queries are the last T key columns
                visible = self._causal(q.shape[2])[..., -S:]
            self._observe(layer, q, keys, visible, self._key_slot(layer, S))
        return out

    def _keys_values(self, layer, k, v):
        """What the layer attends to, (B, KV, S, D): its held view, with the chunk's k, v appended or rebuilt from the
        pages that now hold them (_plan_reads); with nothing held before, the chunk's own k, v, as in the dense cache."""
        if not self.attends_to_past:
            return k, v
        if self.read_rows is None:
            self.held.store(layer, k, v)
        else:
            n = self.held.n_keys[layer]
            self.held.fill(layer, self.k_rows, self.v_rows, self.read_rows[layer][..., -n:])
        return self.held.keys_values(layer)

    def _key_slot(self, layer, S):
        """The slot of each of the layer's S key columns, (B, KV, S), -1 where the head holds none; None when column j
        is slot j in every head (no head of the layer holds fewer slots, and no padding)."""
        if self.attends_to_past:
            return self.key_slot[layer][..., -S:] if self.ragged[layer] else None
        return self.write_slot[layer] if self.padded else None

    def _key_pos(self, layer):
        """The position of each of the layer's key columns, (B, KV or 1, S), -1 where the head holds none."""
        return self.held.key_pos(layer) if self.attends_to_past else self.q_pos[:, None]

    def _causal(self, T: int):
        """(1, 1, T, S) bool: query t sees the key columns up to its own, the queries being the last T of the S key
        columns of this forward (the largest layer's); built once per forward."""
        S = self.held.end if self.attends_to_past else T
        if self.causal is None:
            self.causal = torch.ones(T, S, dtype=torch.bool, device=self.q_pos.device).tril(S - T)[None, None]
        return self.causal

    def _visible(self, key_pos, evicted=None):
        return visible_keys(self.q_pos, key_pos, self.args.sliding_window, evicted, self.observe.dms_window)

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

    def _observe(self, layer, q, keys, visible, key_slot):
        """Record what self.observe asks for from this layer's attention probabilities. visible: (B, KV or 1, T, Tk),
        or None when every query sees every key; key_slot: (B, KV, Tk) the slot of each key, -1 for none, or None
        when key j is slot j."""
        G, Tk = q.shape[1] // keys.shape[1], keys.shape[2]
        received = attention_received(q, keys, visible, self.weights, self.first_weighted)  # (B, KV, R, Tk)
        if key_slot is not None:
            received.masked_fill_((key_slot < 0)[:, :, None], 0)
        mass = received[:, :, 0] if self.observe.mass else None  # (B, KV, Tk)
        window = received[:, :, -G:].transpose(2, 3) if self.observe.window is not None else None  # (B, KV, Tk, G)
        if key_slot is None:
            if mass is not None:
                self.mass[layer][..., :Tk].add_(mass)
            if window is not None:
                self.window[layer][..., :Tk, :].add_(window)
            return
        idx = key_slot.clamp(min=0)
        if mass is not None:
            self.mass[layer].scatter_add_(-1, idx, mass)
        if window is not None:
            self.window[layer].scatter_add_(2, idx[..., None].expand(-1, -1, -1, G), window)
