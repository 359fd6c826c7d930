"""Prefill, decode loop and sampling for a batch of prompts of different lengths."""
import time
from dataclasses import dataclass, field

import torch

from tinytis.cache import DenseKVCache
from tinytis.model import Transformer


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
    generator = torch.Generator(device=ids.device).manual_seed(params.seed)

    t0 = time.perf_counter()
    logits = model.logits(model.hidden_states(ids, positions, cache)[:, -1])
    prefill_s = time.perf_counter() - t0

    tokens = [[] for _ in prompts]
    done = torch.zeros(B, dtype=torch.bool)
    next_pos = positions[:, -1:] + 1
    t0 = time.perf_counter()
    for step in range(params.max_new_tokens):
        nxt = sample(logits, params, generator)
        for b in range(B):
            if done[b]:
                continue
            if nxt[b].item() == eos_id:
                done[b] = True
                continue
            tokens[b].append(nxt[b].item())
            if on_token:
                on_token(b, nxt[b].item())
        if done.all() or step == params.max_new_tokens - 1:
            break
        logits = model(nxt[:, None], next_pos, cache)[:, -1]
        next_pos = next_pos + 1
    decode_s = time.perf_counter() - t0
    return Generation(tokens, sum(len(p) for p in prompts), prefill_s, decode_s, cache.bytes_held())
