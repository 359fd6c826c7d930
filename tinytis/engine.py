"""Prefill, decode loop and sampling for a batch of prompts of different lengths.

generate(): a plain prompt -> continuation run (dense cache by default). prefill() + decode(), or answer() in one
call: contexts compressed into a paged cache by an eviction policy, then questions answered from it.
"""
import time
from dataclasses import dataclass, field, replace

import torch

from tinytis.cache import DenseKVCache, PagedKVCache, PagePool
from tinytis.errors import UserError
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import Policy, make_policy


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and excluding EOS
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    kv_bytes: int
    stats: dict = field(default_factory=dict)
    first_step_s: float = 0.0  # of decode_s: the first decode step, which pays the warm-up

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of decoding after its first step: the steady rate, without the warm-up."""
        return (self.new_tokens - 1) / (self.decode_s - self.first_step_s) if self.new_tokens > 1 else float("nan")

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, V) -> unnormalised probs (B, V) restricted to the smallest top set with mass >= top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token when the tokens ranked above it already cover top_p
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy, or temperature + nucleus (top-p) sampling."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = nucleus(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """Right-align prompts: ids (B, T) and true positions (B, T), -1 where padded."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        positions[b, T - len(p) :] = torch.arange(len(p))
    return ids, positions


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_id: int | None = None,
             cache=None, on_token=None) -> Generation:
    """Prefill every prompt, then decode until each hits EOS or max_new_tokens.

    cache: an empty cache for these prompts (default: a dense one). on_token(b, id) is called as
    each token of prompt b is produced, for streaming.
    """
    weight = model.tok_embeddings.weight
    ids, positions = (t.to(weight.device) for t in left_pad(prompts))
    B, T = ids.shape
    dtype = weight.dtype
    if cache is None:
        cache = DenseKVCache(model.args, B, T + params.max_new_tokens, dtype, ids.device)
    t0 = time.perf_counter()
    logits = model.logits(model.hidden_states(ids, positions, cache)[:, -1])
    prefill_s = time.perf_counter() - t0
    next_pos = positions[:, -1:] + 1

    tokens, decode_s, first_step_s = decode_loop(model, cache, logits, next_pos, params, eos_id, on_token)
    return Generation(tokens, sum(len(p) for p in prompts), prefill_s, decode_s, cache.bytes_held(), {}, first_step_s)


def decode_loop(model, cache, logits, next_pos, params, eos_id=None, on_token=None, after_step=None):
    """Sample from logits (B, V), feed the token at next_pos (B, 1), repeat until EOS or max_new_tokens.

    after_step(ids, positions, hidden) runs after each forward (the cache manager's hook). A row that has hit EOS is
    fed as padding (position -1) from then on, so its cache ends with its last answer token. Returns the new
    tokens per row (up to and excluding EOS), the seconds it took, and the seconds of its first step (sampling the
    first token and the first forward, which pays the warm-up).
    """
    B = logits.shape[0]
    generator = torch.Generator(device=logits.device).manual_seed(params.seed)
    tokens = [[] for _ in range(B)]
    done = [False] * B
    t0 = time.perf_counter()
    first_step_s = 0.0
    for step in range(params.max_new_tokens):
        nxt = sample(logits, params, generator)  # (B,)
        for b, token in enumerate(nxt.tolist()):  # the step's one read from the device
            if done[b]:
                continue
            if token == eos_id:
                done[b] = True
                continue
            tokens[b].append(token)
            if on_token:
                on_token(b, token)
        if all(done) or step == params.max_new_tokens - 1:
            break
        positions = next_pos.masked_fill(torch.tensor(done, device=next_pos.device)[:, None], -1)
        h = model.hidden_states(nxt[:, None], positions, cache)
        if after_step:
            after_step(nxt[:, None], positions, h)
        logits = model.logits(h[:, -1])
        next_pos = next_pos + 1
        if step == 0:
            first_step_s = time.perf_counter() - t0
    return tokens, time.perf_counter() - t0, first_step_s


@dataclass
class Prefilled:
    """Contexts prefilled into a paged cache and evicted to the budget, ready for questions and decoding."""

    cache: PagedKVCache
    manager: CacheManager
    logits: torch.Tensor  # (B, vocab) next-token logits after each context
    next_pos: torch.Tensor  # (B, 1) position of the token that follows each context
    prefill_s: float
    stats: dict  # the manager's statistics right after eviction

    @torch.inference_mode()
    def fork(self) -> "Prefilled":
        """A copy with its own pages, to answer another question from the same compressed contexts."""
        return replace(self, cache=self.cache.fork(), manager=self.manager.fork())

    @torch.inference_mode()
    def free(self):
        self.cache.free(list(range(self.logits.shape[0])))


@torch.inference_mode()
def prefill(model: Transformer, contexts: list[list[int]], manager: CacheManager,
            references: list[list[int]] | None = None, page_size: int = 16) -> Prefilled:
    """Prefill the contexts (left-padded, in chunks when the manager says so) into a paged cache, evicting to budget.

    references: the answer ids of each context, for a policy that needs them (oracle); they are prefilled after
    the context in the same pass, observed, and dropped from the cache again before eviction.
    """
    if not contexts or any(len(c) == 0 for c in contexts):
        raise UserError("every context needs at least one token")
    needs_reference = manager.policy.needs.reference
    if needs_reference and (references is None or len(references) != len(contexts) or any(len(r) == 0 for r in references)):
        raise UserError(f"policy {type(manager.policy).__name__.lower()} needs a non-empty reference answer for every context")
    seqs = [c + r for c, r in zip(contexts, references)] if needs_reference else contexts
    weight = model.tok_embeddings.weight
    ids, positions = (t.to(weight.device) for t in left_pad(seqs))
    B, T = ids.shape
    a = model.args
    chunk = manager.config.prefill_chunk or T
    n_pages = a.n_layers * a.n_kv_heads * sum(-(-min(len(s), chunk) // page_size) + 1 for s in seqs)
    cache = PagedKVCache(a, B, PagePool(a.head_dim, page_size, n_pages, weight.dtype, weight.device))
    manager.start(cache, [len(c) for c in contexts], [len(r) for r in references] if needs_reference else None)

    t0 = time.perf_counter()
    for s in range(0, T, chunk):
        h = model.hidden_states(ids[:, s : s + chunk], positions[:, s : s + chunk], cache)
        manager.after_chunk(cache, ids[:, s : s + chunk], positions[:, s : s + chunk], h)
    if needs_reference:  # the context's last token is followed by its reference answer
        h = h[torch.arange(B), T - 1 - torch.tensor([len(r) for r in references])][:, None]
    manager.after_prefill(cache)
    logits = model.logits(h[:, -1])
    next_pos = torch.tensor([[len(c)] for c in contexts], device=ids.device)
    return Prefilled(cache, manager, logits, next_pos, time.perf_counter() - t0, manager.stats(cache))


@torch.inference_mode()
def decode(model: Transformer, state: Prefilled, questions: list[list[int]] | None, params: SamplingParams,
           eos_id: int | None = None, on_token=None) -> Generation:
    """Feed each context's question (if any) to its compressed cache, then decode. Generation.stats holds the
    cache statistics right after eviction, the peak KV bytes of the pool and the eviction time."""
    cache, manager = state.cache, state.manager
    logits, next_pos, question_s, question_tokens = state.logits, state.next_pos, 0.0, 0
    if questions is not None:
        if len(questions) != len(logits) or any(len(q) == 0 for q in questions):
            raise UserError(f"give one non-empty question per context ({len(logits)}), or none")
        t0 = time.perf_counter()
        ids, positions = (t.to(next_pos.device) for t in left_pad(questions))
        positions = torch.where(positions >= 0, positions + next_pos, -1)
        h = model.hidden_states(ids, positions, cache)
        manager.after_step(cache, ids, positions, h)
        logits, next_pos = model.logits(h[:, -1]), positions[:, -1:] + 1
        question_s, question_tokens = time.perf_counter() - t0, sum(len(q) for q in questions)
    tokens, decode_s, first_step_s = decode_loop(model, cache, logits, next_pos, params, eos_id, on_token,
                                                 lambda ids, pos, h: manager.after_step(cache, ids, pos, h))
    stats = dict(state.stats, peak_kv_bytes=cache.pool.peak_used * cache.pool.page_bytes, evict_s=manager.evict_s)
    return Generation(tokens, sum(manager.lengths) + question_tokens, state.prefill_s + question_s, decode_s,
                      cache.bytes_held(), stats, first_step_s)


def answer(model: Transformer, contexts: list[list[int]], questions: list[list[int]] | None, params: SamplingParams,
           policy: str | Policy, budget: float | int, eos_id: int | None = None,
           references: list[list[int]] | None = None, **options) -> Generation:
    """Compress each context with the policy to the budget, then answer its question from the compressed cache.

    Query-agnostic: the question is not seen before eviction (for the query-aware setting put the question at the
    end of the context and pass questions=None). budget: per (layer, KV head), a fraction of each context in
    (0, 1] or a token count > 1. policy: a name in POLICIES or a Policy (e.g. one loaded with its weights).
    references: answer ids for the oracle policy. options: ManagerConfig fields (n_sink, n_recent, schedule,
    head_adaptive, prefill_chunk, decode_budget, decode_buffer).
    """
    policy = make_policy(policy) if isinstance(policy, str) else policy
    manager = CacheManager(model.args, policy, ManagerConfig(budget, **options))
    return decode(model, prefill(model, contexts, manager, references), questions, params, eos_id)
