"""CacheManager: how many tokens each (layer, KV head) keeps, when to evict, which tokens are anchors, statistics.

The policy only scores. Eviction = score every slot of every sequence, pin the anchors, keep the top-k per
(layer, KV head) (or per layer with head-adaptive allocation), compact the cache so emptied pages go back.
"""
import copy
import math
import time
from dataclasses import dataclass

import torch

from tinytis.cache import Observe, PagedKVCache
from tinytis.anchors import ANCHOR_SHARE, Anchors
from tinytis.config import ModelArgs
from tinytis.errors import UserError
from tinytis.policies import Policy, ScoreContext

PYRAMID_BETA = 20  # PyramidKV: the top layer gets budget / beta, the bottom layer 2 * budget - that


def check_budget(budget, name: str = "budget"):
    """A fraction of the prompt in (0, 1] or a token count > 1, else a UserError."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise UserError(f"{name} must be a number, got {budget!r}")
    if isinstance(budget, int) and budget <= 1 or isinstance(budget, float) and not 0 < budget <= 1:
        raise UserError(f"{name} {budget} is neither a fraction of the prompt in (0, 1] nor a token count > 1")


@dataclass
class ManagerConfig:
    budget: float | int  # tokens kept per (layer, KV head): a fraction of the prompt (0 < b <= 1) or a count (> 1)
    n_sink: int = 4  # the first tokens of a sequence are always kept (within the anchors' share of the budget)
    n_recent: int = 16  # the newest tokens are always kept (within what the share leaves after the sinks)
    anchor_share: float = ANCHOR_SHARE  # sinks + recent take at most this share of each head's budget
    schedule: str = "uniform"  # per-layer budgets: "uniform", or "pyramid" (more in lower layers, same total)
    head_adaptive: bool = False  # one budget per layer, shared across its KV heads by score (AdaKV)
    prefill_chunk: int | None = None  # prefill this many tokens at a time and evict after each chunk
    decode_budget: float | int | None = None  # during decoding, evict back to this when a head holds decode_buffer more
    decode_buffer: int = 16

    def __post_init__(self):
        check_budget(self.budget)
        if self.decode_budget is not None:
            check_budget(self.decode_budget, "decode budget")
        if self.prefill_chunk is not None and (isinstance(self.prefill_chunk, bool) or self.prefill_chunk <= 0):
            raise UserError(f"prefill chunk must be a positive number of tokens, got {self.prefill_chunk}")
        if self.schedule not in ("uniform", "pyramid"):
            raise UserError(f"unknown budget schedule {self.schedule!r}; choose uniform or pyramid")
        if min(self.n_sink, self.n_recent, self.decode_buffer) < 0:
            raise UserError("n_sink, n_recent and decode_buffer must be >= 0")
        if not 0 <= self.anchor_share <= 1:
            raise UserError(f"anchor share must lie in [0, 1], got {self.anchor_share}")


class TokenStore:
    """The tokens of one sequence still held by at least one head, by position: pos (N,), ids (N,) and, when the
    policy needs hidden states, hidden (N, dim). The arrays grow by doubling, so recording a token copies nothing
    (what a policy was shown, the first N rows, never changes)."""

    def __init__(self, device, dim: int | None):
        self.n = 0
        self.arrays = [torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)]
        if dim is not None:
            self.arrays.append(torch.zeros(0, dim, device=device))

    pos = property(lambda self: self.arrays[0][: self.n])
    ids = property(lambda self: self.arrays[1][: self.n])
    hidden = property(lambda self: self.arrays[2][: self.n] if len(self.arrays) == 3 else None)

    def append(self, pos, ids, hidden):
        n = self.n + len(pos)
        if n > len(self.arrays[0]):
            self.arrays = [torch.cat([x, x.new_empty(max(n, 2 * len(x)) - len(x), *x.shape[1:])]) for x in self.arrays]
        for x, new in zip(self.arrays, (pos, ids, hidden)):
            x[self.n : n] = new
        self.n = n

    def keep(self, mask):
        """Keep the tokens where mask (N,) is True, in new arrays: what a policy was shown stays as it was."""
        self.arrays = [x[: self.n][mask] for x in self.arrays]
        self.n = len(self.arrays[0])

    def copy(self) -> "TokenStore":
        other = copy.copy(self)
        other.arrays = [x.clone() for x in self.arrays]
        return other


class CacheManager:
    def __init__(self, args: ModelArgs, policy: Policy, config: ManagerConfig):
        self.args, self.policy, self.config = args, policy, config
        if policy.needs.reference and config.prefill_chunk:
            raise UserError("the oracle scores the whole context in one pass with its reference answer; drop --prefill-chunk")

    def start(self, cache: PagedKVCache, context_lengths: list[int], reference_lengths: list[int] | None = None):
        """Budgets for these sequences (rows of cache) and what the cache must record for the policy."""
        needs = self.policy.needs
        if needs.reference and reference_lengths is None:
            raise UserError(f"policy {type(self.policy).__name__.lower()} needs the reference answer of each context")
        self.lengths = context_lengths
        self.budget = self._budgets(self.config.budget, context_lengths)  # (L, B)
        self.decode_budget = None
        if self.config.decode_budget is not None:
            self.decode_budget = self._budgets(self.config.decode_budget, context_lengths)
        window = reference_lengths if needs.reference else [needs.window] * len(context_lengths) if needs.window else None
        device = cache.length.device
        cache.observe = Observe(mass=needs.mass, window=None if window is None else torch.tensor(window, device=device),
                                dms_window=needs.dms_window,
                                slot_value=needs.slot_value)
        self.tokens = [TokenStore(device, self.args.dim if needs.hidden else None) for _ in context_lengths]
        self.last_pos = torch.full((len(context_lengths),), -1, dtype=torch.long)
        self.evict_s = 0.0

    def fork(self) -> "CacheManager":
        """A copy for a forked cache: same policy and budgets, its own token records."""
        other = copy.copy(self)
        other.tokens = [store.copy() for store in self.tokens]
        return other

    def compress(self, cache: PagedKVCache, policy: Policy, budget, decode_budget=None):
        """Score with `policy` and evict to `budget` from now on: compresses one prefilled cache (or a fork of it)
        another way. The policy may only need what the prefill recorded (same Needs). decode_budget: also evict
        back to this while decoding (as ManagerConfig.decode_budget)."""
        self.policy, self.budget = policy, self._budgets(budget, self.lengths)
        if decode_budget is not None:
            self.decode_budget = self._budgets(decode_budget, self.lengths)
        self.evict(cache, self.budget)

    def _budgets(self, budget, lengths) -> torch.Tensor:
        """Tokens per KV head, (L, B), for a budget given as a fraction of each prompt or as a count."""
        L, anchors = self.args.n_layers, self.config.n_sink + self.config.n_recent
        columns = []
        for n in lengths:
            k = max(1, round(budget * n)) if isinstance(budget, float) else budget
            if k > n:
                raise UserError(f"budget of {k} tokens is more than the {n}-token prompt; give at most {n} or a fraction")
            if self.config.schedule == "pyramid" and L > 1:
                lo = min(k, max(anchors, k // PYRAMID_BETA))
                hi = 2 * k - lo
                columns.append([min(n, math.floor(hi - (hi - lo) * l / (L - 1))) for l in range(L)])
            else:
                columns.append([k] * L)
        return torch.tensor(columns, dtype=torch.long).T

    # -- hooks called by the engine ---------------------------------------------------------------------------------

    def after_chunk(self, cache, ids, positions, hidden):
        """After a prefill forward: record its tokens; with chunked prefill (or DMS), evict back to the budget."""
        self._record(ids, positions, hidden)
        if self.config.prefill_chunk or not self.policy.budgeted:
            self.evict(cache, self.budget)

    def after_prefill(self, cache):
        """The whole context is in: drop the reference answer if there is one, and evict to the budget."""
        if self.policy.needs.reference:
            cache.truncate(torch.tensor(self.lengths, device=cache.length.device))
            cache.observe = cache.observe.per_slot()  # keep the answer's attention as the scores
            self.last_pos = torch.tensor(self.lengths) - 1
            self._prune(cache)
        self.evict(cache, self.budget)

    def after_step(self, cache, ids, positions, hidden):
        """After a forward past the context (question or decoding): record; evict if a head ran past its buffer
        (DMS: evict what the policy decided, after every forward)."""
        self._record(ids, positions, hidden)
        if not self.policy.budgeted:
            self.evict(cache, self.budget)
        elif self.decode_budget is not None and self._over(cache, self.decode_budget + self.config.decode_buffer):
            self.evict(cache, self.decode_budget)

    def _record(self, ids, positions, hidden):
        T = positions.shape[1]
        for b, (store, n) in enumerate(zip(self.tokens, (positions >= 0).sum(1).tolist())):
            store.append(positions[b, T - n :], ids[b, T - n :], hidden[b, T - n :])  # padding comes first
        self.last_pos = torch.maximum(self.last_pos, positions.max(1).values.cpu())

    # -- eviction ---------------------------------------------------------------------------------------------------

    def _over(self, cache, budget) -> bool:
        """Does any head (any layer, with head-adaptive allocation) hold more than budget (L, B)?"""
        held, budget = cache.length, budget.to(cache.length.device)
        if self.config.head_adaptive:
            return bool((held.sum(-1) > budget * held.shape[-1]).any())
        return bool((held > budget[..., None]).any())

    def evict(self, cache: PagedKVCache, budget: torch.Tensor):
        """Keep, per (layer, KV head), the anchors and the best-scored slots up to budget (L, B); free the rest.
        A policy without a budget (DMS) keeps every slot it does not score -inf."""
        if not self.policy.evicts or self.policy.budgeted and not self._over(cache, budget):
            return
        t0 = time.perf_counter()
        L, B, KV = cache.length.shape
        S = int(cache.length.max())
        scores = torch.full((L, B, KV, S), -math.inf, dtype=torch.float64, device=cache.length.device)
        for b in range(B):
            n = int(cache.length[:, b].max())
            if n:
                scores[:, b, :, :n] = self.policy.score(self.context(cache, b, n, budget[:, b]))
        pos = cache.pos[..., :S]
        if self.policy.budgeted:
            k = budget.to(pos.device)[..., None, None]  # (L, B, 1, 1)
            anchors = self.policy.anchors or Anchors(self.config.n_sink, self.config.n_recent, self.config.anchor_share)
            n_sink, n_recent = anchors.counts(k)  # (L, B, 1, 1) each
            pinned = (pos >= 0) & ((pos < n_sink) | (pos > self.last_pos.to(pos.device)[None, :, None, None] - n_recent))
            # anchors rank above everything, even a policy's own +inf (SnapKV's window, H2O's recent half)
            scores = scores.clamp(max=torch.finfo(scores.dtype).max).masked_fill(pinned, math.inf).masked_fill(pos < 0, -math.inf)
            keep = top_k(scores, k[..., 0, 0], self.config.head_adaptive)
        else:
            keep = scores > -math.inf
        cache.compact(keep & (pos >= 0))
        self._prune(cache)
        self.evict_s += time.perf_counter() - t0

    def context(self, cache: PagedKVCache, b: int, n: int, budget: torch.Tensor) -> ScoreContext:
        """What the policy sees of sequence b: its first n slots of every (layer, KV head)."""
        needs, store = self.policy.needs, self.tokens[b]
        return ScoreContext(
            positions=cache.pos[:, b, :, :n],
            budget=budget.to(cache.length.device),
            last_pos=int(self.last_pos[b]),
            token_pos=store.pos,
            token_ids=store.ids,
            hidden=store.hidden,
            mass=cache.mass[:, b, :, :n] if needs.mass else None,
            window=cache.window[:, b, :, :n] if needs.window or needs.reference else None,
            keys=cache.keys(b, n) if needs.keys else None,
            evict=cache.evict[:, b, :, :n] if needs.dms_window is not None else None,
            slot_value=cache.slot_value[:, b, :, :n] if needs.slot_value else None,
        )

    def _prune(self, cache):
        """Forget the tokens no head holds any more."""
        for b, store in enumerate(self.tokens):
            pos = cache.pos[:, b]
            store.keep(torch.isin(store.pos, pos[pos >= 0]))

    # -- statistics -------------------------------------------------------------------------------------------------

    def stats(self, cache: PagedKVCache) -> dict:
        """What the cache holds now against what a full cache of the contexts would hold."""
        full = sum(self.lengths)
        return {
            "live_pages": cache.pages_held(),
            "kv_bytes_held": cache.bytes_held(),
            "kv_bytes_full": full * cache.token_bytes,
            "tokens_held": cache.length.sum(1).tolist(),  # [layer][KV head], summed over the sequences
            "tokens_full": full,
            "evict_s": self.evict_s,
        }


def top_k(scores: torch.Tensor, k: torch.Tensor, per_layer: bool) -> torch.Tensor:
    """Keep mask of the k (L, B) best slots of each head of scores (L, B, KV, S); per_layer: of the k * KV best slots
    of each layer's heads taken together. Ties go to the earlier slot (and head)."""
    L, B, KV, S = scores.shape
    if per_layer:
        return (rank(scores.reshape(L, B, KV * S)) < (k * KV)[..., None]).view(L, B, KV, S)
    return rank(scores) < k[..., None, None]


def rank(scores: torch.Tensor) -> torch.Tensor:
    """0 for the highest score along the last dim, 1 for the next, ...; ties ranked in index order."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
