"""PagedKVCache: a forward through the page tables. begin_forward works out, once for all layers, where the chunk's
keys go, which pool rows each layer reads and whether its attention needs a mask; attend writes, gathers and attends."""
import torch

from tinytis import kernels
from tinytis.cache.attention import Observe, additive_mask, attention_received, counted_queries, visible_keys
from tinytis.cache.pool import PagePool
from tinytis.cache.tables import PageTables
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
        self.gathered = pool.k.new_empty(2, 0, args.head_dim)  # K and V rows gathered for attention, reused (_gather)

    def fork(self) -> "PagedKVCache":
        """A copy of this cache on the same pool, with its own pages (a copy of every page held)."""
        other = super().fork()
        other.observe = self.observe.per_slot()  # its own statistics start afresh
        return other

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
        self.counted, self.first_counted = counted_queries(self.observe, self.q_pos, self.mass.dtype)

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
            mask = additive_mask(visible, H, q.dtype)
        else:
            if self.self_mask is None:  # the same in every layer
                self.self_visible = self._visible(self._key_pos(layer, cols))  # (B, 1, T, T)
                self.self_mask = additive_mask(self.self_visible, H, q.dtype)
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

    def _visible(self, key_pos, evicted=None):
        return visible_keys(self.q_pos, key_pos, self.args.sliding_window, evicted, self.observe.dms_window)

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

    def _observe(self, layer, q, keys, visible, key_slot):
        """Record what self.observe asks for from this layer's attention probabilities.
        visible: (B, KV or 1, T, Tk); key_slot: (B, KV, Tk) the slot of each key, -1 for none."""
        G = q.shape[1] // keys.shape[1]
        summed = attention_received(q, keys, visible, self.counted, self.first_counted)  # (B, KV, G, C, Tk)
        summed.masked_fill_((key_slot < 0)[:, :, None, None], 0)
        idx = key_slot.clamp(min=0)
        if self.observe.mass:
            self.mass[layer].scatter_add_(-1, idx, summed[:, :, :, 0].mean(2))
        if self.observe.window is not None:
            self.window[layer].scatter_add_(2, idx[..., None].expand(-1, -1, -1, G), summed[:, :, :, -1].transpose(2, 3))
