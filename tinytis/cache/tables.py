"""PageTables: which slots each (layer, sequence, KV head) holds, in which pages of a PagePool, and what is known of
each slot; the bookkeeping half of PagedKVCache: give heads pages, compact them after eviction, free, fork."""
import torch

from tinytis.cache.pool import PagePool
from tinytis.config import ModelArgs

# the per-slot state, (L, B, KV, P * ps, ...) each, and the value of an unused slot
PER_SLOT = (("pos", -1), ("mass", 0), ("window", 0), ("evict", False), ("slot_value", 0))


class PageTables:
    """A page table per (layer, sequence, KV head) into a PagePool, so heads hold different tokens.

    State, stacked over layers L, sequences B (rows of the batch) and KV heads:
      table   (L, B, KV, P)            page ids, -1 unused; a head holds exactly its first ceil(length / page_size)
      length  (L, B, KV)               slots in use; slot s is row s % page_size of page table[s // page_size]
      pos     (L, B, KV, P * ps)       original position of each slot, -1 when unused; strictly increasing along slots
      mass    (L, B, KV, P * ps)       attention each slot has received (Observe.mass)
      window  (L, B, KV, P * ps, G)    attention from the latest forward's window queries, per query head (Observe.window)
      evict   (L, B, KV, P * ps)       DMS decided to evict the slot once it leaves the window (Observe.dms_window)
      slot_value (L, B, KV, P * ps)    computed from the layer's input when the slot was written (Observe.slot_value)
    """

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
        held, needed = (self.length + (ps - 1)) // ps, (new_len + (ps - 1)) // ps
        extra = (needed - held).flatten()
        total = int(extra.sum())
        if total == 0:
            return
        self._widen(int(needed.max()))
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
        cat = lambda x, n, fill: torch.cat([x, x.new_full((*x.shape[:3], n, *x.shape[4:]), fill)], dim=3)
        self.table = cat(self.table, extra, -1)
        for name, fill in PER_SLOT:
            setattr(self, name, cat(getattr(self, name), extra * self.pool.page_size, fill))

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
        for name, fill in PER_SLOT:
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
        self.table = self.table[..., :P].contiguous()
        for name, _ in PER_SLOT:
            setattr(self, name, getattr(self, name)[:, :, :, : P * self.pool.page_size].contiguous())

    def truncate(self, limit: torch.Tensor):
        """Drop every slot whose position is >= limit[b] (B,), e.g. the reference answer after an oracle pass."""
        self.compact((self.pos >= 0) & (self.pos < limit[None, :, None, None]))

    def free(self, rows: list[int]):
        """Return every page of these sequences to the pool; the rows are empty again and may start a new sequence."""
        n_pages = (self.length + self.pool.page_size - 1) // self.pool.page_size
        n_pages[:, rows] = 0
        self.length[:, rows] = 0
        for name, fill in PER_SLOT:
            getattr(self, name)[:, rows] = fill
        self._free_pages_past(n_pages)

    def fork(self):
        """A copy of these tables on the same pool, with its own pages (a copy of every page held)."""
        other = type(self)(self.args, self.length.shape[1], self.pool)
        held = self.table >= 0
        ids = self.pool.alloc(int(held.sum()))
        self.pool.k[ids], self.pool.v[ids] = self.pool.k[self.table[held]], self.pool.v[self.table[held]]
        other.table = self.table.clone()
        other.table[held] = ids
        other.length = self.length.clone()
        for name, _ in PER_SLOT:
            setattr(other, name, getattr(self, name).clone())
        return other

    def keys(self, b: int, n_slots: int) -> torch.Tensor:
        """Cached keys of sequence b, slots 0..n_slots-1 of every (layer, KV head): (L, KV, n_slots, D)."""
        L, _, KV, _ = self.table.shape
        slot = torch.arange(n_slots, device=self.table.device).expand(L, KV, n_slots)
        return self.pool.rows("k")[self._rows(self.table[:, b], slot)]
