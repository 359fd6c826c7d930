"""HeldKV: per layer, a contiguous copy of the K and V each (sequence, KV head) holds, so that a decode step's
attention reads a slice of it instead of gathering every held row from the pages.

The pages stay the memory that is accounted and freed; this is a cache of their content. A forward in which every
head gains the same T slots (a decode step, an unpadded chunk) appends them in place. Whatever else changes which
slots the heads hold (compact, free, truncate, a padded chunk, a forward that wrote the pages through the kernels)
leaves it invalid, and the next forward that attends to the past rebuilds it, layer by layer, from the pages.
"""
import torch


class HeldKV:
    """The held K and V of every layer, each head's slots right-aligned at a common end column (so that without
    eviction the keys sit where DenseKVCache has them, left padding first):

      k, v    L x (B, KV, C, D)  layer l attends to columns [end - n_keys[l], end); a head holding fewer than
                                 n_keys[l] slots has them in the last columns, and what is left of them is masked
      pos     (L, B, KV, C)      position of the token in each column, -1 where the head holds none
      n_keys  [L]                the most slots a head of each layer holds
      ragged  [L]                whether some head of the layer holds fewer (its attention needs a mask)
    Columns [end, C) are room for the tokens to come. K and V are held in fp32 when the pool's are in a lower
    precision (bf16, fp16): the upcast is exact, and attention in fp32 over them is several times faster on CPU than
    SDPA in bf16 (its output is rounded back to the model's dtype); it takes twice the memory of the pages it copies.
    """

    def __init__(self):
        self.k = self.v = self.pos = None

    @property
    def valid(self) -> bool:
        return self.k is not None

    def invalidate(self):
        self.k = self.v = self.pos = None

    def reset(self, key_pos: torch.Tensor, lengths: torch.Tensor, like: torch.Tensor):
        """Start afresh for held slots at key_pos (L, B, KV, S), right-aligned, with lengths (L, B, KV) slots per
        head; K and V are filled in by fill(), a layer at a time. like: a tensor of the pool (dtype, device)."""
        L, B, KV, S = key_pos.shape
        self.end = S
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.k = [like.new_empty(B, KV, self._room(S), like.shape[-1], dtype=dtype) for _ in range(L)]
        self.v = [torch.empty_like(k) for k in self.k]
        self.pos = key_pos.new_full((L, B, KV, self._room(S)), -1)
        self.pos[..., :S] = key_pos
        n_keys = lengths.amax((1, 2))  # (L,)
        self.ragged = (lengths < n_keys[:, None, None]).flatten(1).any(1).tolist()
        self.n_keys = n_keys.tolist()

    def fill(self, layer: int, k_rows, v_rows, rows):
        """Copy the pool's K and V rows (N, D) at rows (B, KV, n_keys[layer]) into the layer's key columns."""
        cols = slice(self.end - rows.shape[-1], self.end)
        self.k[layer][:, :, cols] = k_rows[rows]
        self.v[layer][:, :, cols] = v_rows[rows]

    def append(self, positions: torch.Tensor):
        """Make room for T new slots in every head, positions (B, T); store() writes their K and V."""
        T = positions.shape[1]
        if self.end + T > self.pos.shape[3]:
            self._grow(self.end + T)
        self.pos[..., self.end : self.end + T] = positions[None, :, None]
        self.end += T
        self.n_keys = [n + T for n in self.n_keys]

    def store(self, layer: int, k, v):
        """The appended slots' k, v (B, KV, T, D) of this layer, into the last T columns."""
        cols = slice(self.end - k.shape[2], self.end)
        self.k[layer][:, :, cols] = k
        self.v[layer][:, :, cols] = v

    def keys_values(self, layer: int):
        """The layer's key columns: K and V (B, KV, n_keys[layer], D), views of the buffers."""
        cols = slice(self.end - self.n_keys[layer], self.end)
        return self.k[layer][:, :, cols], self.v[layer][:, :, cols]

    def key_pos(self, layer: int):
        """The position of each of the layer's key columns, (B, KV, n_keys[layer]), -1 where the head holds none."""
        return self.pos[layer, :, :, self.end - self.n_keys[layer] : self.end]

    @staticmethod
    def _room(n: int) -> int:
        """Columns to allocate for n: a quarter more, so that appending copies the buffers O(log) times."""
        return n + n // 4 + 16

    def _grow(self, n: int):
        """Room for n columns: the buffers copied into larger ones."""
        C = self._room(n)
        pad = lambda x, fill: torch.cat([x, x.new_full((*x.shape[:-2], C - x.shape[-2], x.shape[-1]), fill)], dim=-2)
        self.k, self.v = [pad(k, 0) for k in self.k], [pad(v, 0) for v in self.v]
        self.pos = torch.cat([self.pos, self.pos.new_full((*self.pos.shape[:3], C - self.pos.shape[3]), -1)], dim=3)
