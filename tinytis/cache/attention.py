"""The masks of a PagedKVCache's attention, and the attention statistics it records for the eviction policy."""
from dataclasses import dataclass
from typing import Callable

import torch


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


def visible_keys(q_pos, key_pos, sliding_window: int | None, evicted=None, dms_window: int | None = None):
    """Which keys each query of the chunk sees: q_pos (B, T), key_pos (B, X, Tk) -> bool (B, X, T, Tk). A real query
    sees the held keys not after it (within the sliding window; for DMS, evicted (B, X, Tk) keys only within
    dms_window); a padded query sees every key, so no softmax row is empty, and its output is never used."""
    q, k = q_pos[:, None, :, None], key_pos[:, :, None, :]
    visible = (k <= q) & (k >= 0)
    if sliding_window is not None:
        visible &= q - k < sliding_window
    if evicted is not None:
        visible = visible & (~evicted[:, :, None, :] | (q - k <= dms_window))
    return visible | (q < 0)


def additive_mask(visible, n_heads: int, dtype):
    """The additive mask SDPA takes: 0 where visible (B, 1 or KV, T, S), -inf elsewhere: (B, 1 or n_heads, T, S)."""
    if visible.shape[1] > 1:
        visible = visible.repeat_interleave(n_heads // visible.shape[1], dim=1)
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def query_weights(observe: Observe, q_pos, group: int, dtype):
    """What each query of the chunk, q_pos (B, T), counts for in each statistic in observe, per query head of a GQA
    group of `group`: (B, 1, R, group, T), or None; and the first query that counts for any. Row 0 is the mass
    (every real query, 1 / group each: the mean over the group), and with the window, rows 1..group are the window
    of each query head (each row's last window[b] real queries)."""
    if not observe.mass and observe.window is None:
        return None, 0
    real = q_pos >= 0  # (B, T)
    rows = [real[:, None, None, :].expand(-1, 1, group, -1) / group] if observe.mass else []
    if observe.window is not None:
        window = real & (real.flip(1).cumsum(1).flip(1) <= observe.window[:, None].to(real.device))
        rows.append(torch.eye(group, device=real.device)[None, :, :, None] * window[:, None, None, :])
        first = 0 if observe.mass else real.shape[1] - int(window.sum(1).max())
    else:
        first = 0
    return torch.cat(rows, 1).to(dtype)[:, None], first


def attention_received(q, keys, visible, weights, first: int):
    """The attention each key receives from the queries, weighted, a block of queries at a time: q (B, H, T, D), keys
    (B, KV, Tk, D), visible (B, KV or 1, T, Tk) or None for all, weights (B, 1, R, G, T) from query_weights ->
    (B, KV, R, Tk), in weights' dtype."""
    B, H, T, D = q.shape
    KV, Tk = keys.shape[1], keys.shape[2]
    G, R = H // KV, weights.shape[2]
    block = max(1, 2**24 // (B * H * Tk))
    received = None
    for t1 in range(T, first, -block):  # the last block first: it sees every key, and gives received its shape
        t0 = max(first, t1 - block)
        n = Tk - (T - t1)  # keys are in position order and the last T - t1 are after every real query of the block
        qb = (q[:, :, t0:t1] * D**-0.5).reshape(B, KV, G * (t1 - t0), D).to(weights.dtype)
        logits = qb @ keys[:, :, :n].to(weights.dtype).transpose(-1, -2)  # (B, KV, G * (t1 - t0), n)
        if visible is not None:
            logits.view(B, KV, G, t1 - t0, n).masked_fill_(~visible[:, :, None, t0:t1, :n], float("-inf"))
        part = weights[..., t0:t1].reshape(B, 1, R, G * (t1 - t0)) @ logits.softmax(-1)  # (B, KV, R, n)
        if received is None:
            received = part
        else:
            received[..., :n] += part
    return received
