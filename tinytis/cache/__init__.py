"""KV caches. A cache stores each forward chunk's keys and values and runs attention over what it holds.

Interface used by the model:
  begin_forward(positions)           positions (B, T) of the chunk about to run, -1 for padding
  attend(layer, q, k, v, x) -> out   store k, v: (B, KV, T, D) for this layer, attend q: (B, H, T, D) to the cache;
                                     x: (B, T, dim) the layer's normed input, for a cache that records a value per slot
A cache with takes_rope = True (PagedKVCache) gets q and k before RoPE and the chunk's tinytis.model.Rope as a
sixth argument, and rotates them itself: on the kernel path fused with the page write.

  dense.py      DenseKVCache: contiguous K and V, the baseline every other cache is checked against
  pool.py       PagePool: the memory, fixed-size pages of K and V rows and the stack of free ones
  tables.py     PageTables: which slots each (layer, sequence, KV head) holds, in which pages; compact, free, fork
  paged.py      PagedKVCache: a forward through the page tables (where keys go, what each layer reads) and attention
  view.py       HeldKV: a contiguous copy of what each head holds, that decode steps append to (what attention reads)
  attention.py  masks of the paged attention and the statistics it records for the eviction policy (Observe)
"""
from tinytis.cache.attention import Observe
from tinytis.cache.dense import DenseKVCache
from tinytis.cache.paged import PagedKVCache
from tinytis.cache.pool import PagePool

__all__ = ["DenseKVCache", "Observe", "PagePool", "PagedKVCache"]
