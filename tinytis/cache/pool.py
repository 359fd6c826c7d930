"""PagePool: the memory of the paged cache, fixed-size pages of K and V rows and a stack of the free ones."""
import torch


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
