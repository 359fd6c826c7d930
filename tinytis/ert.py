"""ERT: train the importance scores on what eviction does to the model's answers.

One training example is a context followed by a continuation (question + answer). The context is
prefilled once with the frozen model and its keys and values are kept, exactly as at inference
time, where eviction happens after the prefill. Then the continuation runs twice over them:

  teacher  full cache                              -> p_full, and the oracle labels (attention mass
                                                      the continuation puts on each context token)
  student  context keys biased by log m_i          -> p_evicted
           m_i = sigmoid((s_i - tau) / T), tau between the k-th and (k+1)-th score of the
           (layer, KV head), k = budget x context length - anchors; anchors have m = 1

loss = KL(p_full || p_evicted) over the continuation + lambda_align x alignment(s, oracle labels)

The soft mask keeps the top-k set that inference keeps (m > 0.5 exactly for those tokens) and
lets gradient reach the scores near the threshold; the alignment term (a listwise cross-entropy
between softmax(s) and the normalised oracle mass) reaches the tokens far below it.
"""
import math

import torch
import torch.nn.functional as F

from tinytis.anchors import Anchors
from tinytis.model import attention_mask


def attention_with_probs(q, k, v, mask, bias=None):
    """Explicit GQA attention that also returns the probabilities.
    q: (B, H, T, D); k, v: (B, KV, S, D); mask: additive (B, 1, T, S); bias: (B, KV, S) or None.
    -> out (B, H, T, D), probs (B, KV, G, T, S)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    qg = q.view(B, KV, H // KV, T, D)
    logits = torch.einsum("bkgtd,bksd->bkgts", qg, k) / math.sqrt(D) + mask[:, :, None]
    if bias is not None:
        logits = logits + bias[:, :, None, None, :]
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    out = torch.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.reshape(B, H, T, D), probs


class ContextKV:
    """A cache for training: holds a prefilled context's K/V per layer, never modified afterwards.

    While filling, chunks attend causally to themselves. Afterwards a continuation attends to the
    context (with an optional per-key bias, the soft eviction mask) and to itself, out of place so
    autograd can flow through the bias; the attention mass it puts on context keys is recorded.
    """

    def __init__(self):
        self.k, self.v = [], []
        self.ctx_pos = None
        self.key_bias = None  # (n_layers, B, KV, C)
        self.mass = None  # (B, n_layers, KV, C): attention mass the last continuation put on each context key

    def begin_forward(self, positions):
        self.q_pos = positions
        self.filling = self.ctx_pos is None
        if self.filling:
            self.ctx_pos = positions
        else:
            self.mass = []
            self.k_pos = torch.cat((self.ctx_pos, positions), dim=1)

    def attend(self, layer, q, k, v, x=None):
        if self.filling:
            self.k.append(k)
            self.v.append(v)
            if layer == 0:
                self.mask = attention_mask(self.q_pos, self.q_pos, None, q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)
        C = self.ctx_pos.shape[1]
        keys, values = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        bias = None
        if self.key_bias is not None:
            bias = F.pad(self.key_bias[layer], (0, k.shape[2]))
        if layer == 0:
            self.mask = attention_mask(self.q_pos, self.k_pos, None, q.dtype)
        out, probs = attention_with_probs(q, keys, values, self.mask, bias)
        self.mass.append(probs[..., :C].sum(dim=3).mean(dim=2))  # (B, KV, C): sum over queries, mean over group
        if layer == len(self.k) - 1:
            self.mass = torch.stack(self.mass, dim=1)
        return out


def context_lengths(ctx_pos):
    """(B, 1): the real tokens of each left-padded context."""
    return (ctx_pos >= 0).sum(dim=1, keepdim=True)


def anchor_mask(ctx_pos, anchors: Anchors, budget: float = 1.0):
    """(B, C) bool: the anchors of each context at `budget` (the first sinks and the last recent real tokens, within
    the anchors' share of the budget; the manager pins the same ones)."""
    length = context_lengths(ctx_pos)
    n_sink, n_recent = anchors.counts(torch.round(budget * length))
    return (ctx_pos >= 0) & ((ctx_pos < n_sink) | (ctx_pos >= length - n_recent))


def soft_keep_log_mask(scores, ctx_pos, budget: float, anchors: Anchors, temperature: float = 1.0):
    """log m for every context key: scores (B, L, KV, C) -> (L, B, KV, C), 0 for anchors, -inf for padding."""
    pinned = anchor_mask(ctx_pos, anchors, budget)[:, None, None, :]
    real = (ctx_pos >= 0)[:, None, None, :]
    candidates = real & ~pinned
    k = (torch.round(budget * context_lengths(ctx_pos)) - pinned.sum(dim=-1)[:, 0, 0, None]).clamp(min=0).long()  # (B, 1)
    ranked = scores.detach().masked_fill(~candidates, float("-inf")).sort(dim=-1, descending=True).values
    C = scores.shape[-1]
    idx = k[:, :, None, None].expand(*scores.shape[:-1], 1)
    last_kept = ranked.gather(-1, (idx - 1).clamp(min=0))
    first_evicted = ranked.gather(-1, idx.clamp(max=C - 1)).masked_fill(idx >= C, float("-inf"))
    tau = torch.where(idx == 0, last_kept + temperature, (last_kept + first_evicted) / 2)  # k == 0: evict all
    log_m = F.logsigmoid((scores - tau) / temperature)
    log_m = torch.where(pinned, torch.zeros_like(log_m), log_m)
    log_m = log_m.masked_fill(~real, float("-inf"))
    return log_m.permute(1, 0, 2, 3)


def alignment_loss(scores, labels, ctx_pos, anchors: Anchors):
    """Listwise cross-entropy between softmax(scores) and the normalised oracle mass, over the tokens that are not
    anchors at the full budget. scores, labels: (B, L, KV, C)."""
    candidates = ((ctx_pos >= 0) & ~anchor_mask(ctx_pos, anchors))[:, None, None, :]
    target = labels.masked_fill(~candidates, 0)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-9)
    log_q = torch.log_softmax(scores.masked_fill(~candidates, float("-inf")), dim=-1)
    return -(target * log_q.masked_fill(~candidates, 0)).sum(-1).mean()


def kl_full_evicted(teacher_logits, student_logits, loss_mask):
    """Mean over masked positions of KL(p_full || p_evicted). logits: (B, T, V); loss_mask: (B, T) bool."""
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    log_q = torch.log_softmax(student_logits, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kl * loss_mask).sum() / loss_mask.sum().clamp(min=1)
