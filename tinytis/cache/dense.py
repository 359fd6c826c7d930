"""DenseKVCache: contiguous K and V, every token of every layer and KV head in place."""
import torch

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
