"""The Mistral architecture in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU (and Qwen3's q/k RMSNorm).

The model does not own a KV cache. A forward pass is given one (or none, for training and
scoring full sequences): the cache stores the new keys and values and runs attention over
whatever it holds, which is how eviction stays out of the model.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinytis import nf4, nf4_linear
from tinytis.config import ModelArgs
from tinytis.dms import METADATA_FILE, DMSConfig, attach
from tinytis.errors import UserError
from tinytis.weights import Checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x / sqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times the weight (as transformers does); in fp32,
        one fused op with the same result."""
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3 RoPE scaling: wavelengths longer than original / low_freq_factor are stretched by factor, those
    shorter than original / high_freq_factor are kept, and the ones between are interpolated."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    stretched = torch.where(wavelen > original_max_position_embeddings / low_freq_factor, inv_freq / factor, between)
    return torch.where(wavelen < original_max_position_embeddings / high_freq_factor, inv_freq, stretched)


def rope_inv_freq(head_dim: int, theta: float, device=None, scaling: dict | None = None) -> torch.Tensor:
    """RoPE frequencies (head_dim / 2,) fp32: theta^(-2i / head_dim); scaling: llama3's."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    return inv_freq if scaling is None else llama3_inv_freq(inv_freq, **scaling)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype, scaling: dict | None = None):
    """cos and sin for RoPE on halves at integer positions (B, T) -> (B, 1, T, head_dim) each; scaling: llama3's."""
    return _cos_sin(positions, rope_inv_freq(head_dim, theta, positions.device, scaling), dtype)


def _cos_sin(positions, inv_freq, dtype):
    freqs = positions.clamp(min=0).float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x: (B, H, T, D) by pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Rope:
    """The rotation of one forward chunk, computed once and shared by its layers.

    positions (B, T) true positions (-1 for padding); inv_freq (D/2,) fp32; cos, sin (B, 1, T, D) in the model's
    dtype. A cache that stores keys in pages gets q and k unrotated with this, so that on the kernel path it can
    rotate and write them in one fused kernel (kernels.rope_cache_write); elsewhere it calls apply.
    """

    def __init__(self, positions, inv_freq, dtype):
        self.positions, self.inv_freq = positions, inv_freq
        self.cos, self.sin = _cos_sin(positions, inv_freq, dtype)
        half = self.sin.shape[-1] // 2
        self.signed_sin = torch.cat((-self.sin[..., :half], self.sin[..., half:]), dim=-1)

    def apply(self, x):
        """apply_rope(x, cos, sin) in fewer ops, bit for bit: rotate_half(x) * sin = roll(x, D/2) * signed_sin."""
        return x * self.cos + x.roll(x.shape[-1] // 2, -1) * self.signed_sin


def attention_mask(q_pos, k_pos, sliding_window: int | None, dtype=torch.float32):
    """Which keys each query sees, as an additive mask: (B, Tq), (B, Tk) -> (B, 1, Tq, Tk), 0 or -inf.

    A key is visible when it is not after the query (and within the sliding window). Position -1
    marks padding: padded queries see only padded keys, so no row of the softmax is empty.
    The mask is built once per forward and shared by all layers (an additive float mask is also
    cheaper for SDPA than a boolean one).
    """
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    visible = (k <= q) & ((k >= 0) | (q < 0))
    if sliding_window is not None:
        visible &= q - k < sliding_window
    return torch.zeros(visible.shape, dtype=dtype, device=q_pos.device).masked_fill(~visible, float("-inf"))


def attend(q, k, v, mask=None, key_bias=None):
    """Grouped-query attention. q: (B, H, Tq, D); k, v: (B, KV, Tk, D); mask: additive (B, 1 or H, Tq, Tk), or None
    for causal with the queries as the last Tq keys; key_bias: (B, KV, Tk) added to the logits of every query of the group."""
    Tq, Tk = q.shape[2], k.shape[2]
    if key_bias is None and mask is None and Tq in (1, Tk):  # SDPA's is_causal aligns the queries with the first keys
        return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, enable_gqa=True)
    if mask is None:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        mask = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device).masked_fill(~causal, float("-inf"))[None, None]
    if key_bias is not None:
        group = q.shape[1] // k.shape[1]
        mask = mask + key_bias.repeat_interleave(group, dim=1)[:, :, None, :].to(q.dtype)  # (B, H, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        d = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * d, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * d, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * d, bias=False)
        self.wo = nn.Linear(args.n_heads * d, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, args.norm_eps), RMSNorm(d, args.norm_eps)
        self.dms = None  # a DMSConfig: a query channel carries the eviction logits (tinytis.dms)

    def forward(self, x, rope: Rope, cache=None, mask=None, key_bias=None):
        B, T, _ = x.shape
        d = self.args.head_dim
        # q: (B, H, T, D); k, v: (B, KV, T, D)
        q = self.wq(x).view(B, T, self.args.n_heads, d).transpose(1, 2)
        k = self.wk(x).view(B, T, self.args.n_kv_heads, d).transpose(1, 2)
        v = self.wv(x).view(B, T, self.args.n_kv_heads, d).transpose(1, 2)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if getattr(cache, "takes_rope", False) and self.dms is None:  # PagedKVCache: rotates q, k itself
            out = cache.attend(self.layer_id, q, k, v, x, rope)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        if self.dms is not None:
            q, evict_logits = self.dms.borrow(q, self.args.n_kv_heads)  # (B, KV, T)
        q, k = rope.apply(q), rope.apply(k)
        if self.dms is not None:
            q = self.dms.zero(q, self.args.n_kv_heads)  # RoPE rotated the channel's pair into it
            if cache is not None:
                cache.decide(self.layer_id, evict_logits)
        if cache is None:
            out = attend(q, k, v, mask, None if key_bias is None else key_bias[self.layer_id])
        else:
            out = cache.attend(self.layer_id, q, k, v, x)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache=None, mask=None, key_bias=None):
        h = x + self.attention(self.attention_norm(x), rope, cache, mask, key_bias)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.dms = None  # the DMSConfig of a DMS model (tinytis.dms.attach)

    def init_weights(self, seed: int, std: float = 0.02):
        """Random initialisation for training from scratch (norms at 1, linear and embedding ~ N(0, std))."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std)

    def hidden_states(self, ids, positions=None, cache=None, key_bias=None):
        """Final-normed hidden states (B, T, dim).

        ids: (B, T). positions: (B, T) true positions, -1 for padding; None means 0..T-1.
        cache: stores this chunk's keys and values and attends over what it holds; with cache=None
        the chunk attends causally to itself. key_bias: (n_layers, B, n_kv_heads, T) added to the
        attention logits of each key (the soft eviction mask of ERT training); cache=None only.
        """
        B, T = ids.shape
        x = self.tok_embeddings(ids)
        mask = None
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
            if self.args.sliding_window is not None:
                mask = attention_mask(positions, positions, self.args.sliding_window, x.dtype)
        elif cache is None:
            mask = attention_mask(positions, positions, self.args.sliding_window, x.dtype)
        if cache is not None:
            cache.begin_forward(positions)
        a = self.args
        rope = Rope(positions, rope_inv_freq(a.head_dim, a.rope_theta, ids.device, a.rope_scaling), x.dtype)
        for layer in self.layers:
            x = layer(x, rope, cache, mask, key_bias)
        return self.norm(x)

    def logits(self, h):
        return self.output(h).float()

    def forward(self, ids, positions=None, cache=None, key_bias=None):
        return self.logits(self.hidden_states(ids, positions, cache, key_bias))

    @classmethod
    def from_pretrained(cls, path: Path, dtype=torch.float32, quant: str | None = None, device="cpu") -> "Transformer":
        """Build the model on the meta device and fill it one checkpoint tensor at a time, each moved to device.

        quant="nf4" quantizes the Linear layers of the blocks as their weights arrive (on device), so loading
        holds the NF4 model plus one dense tensor. Weights saved in NF4 by transformers + bitsandbytes load as NF4.
        """
        if quant not in (None, "nf4"):
            raise UserError(f"quant={quant!r}: tinytis quantizes to 'nf4' only")
        args = ModelArgs.from_dir(path)
        checkpoint = Checkpoint(path)
        with torch.device("meta"):
            model = cls(args)
        expected = dict(model.named_parameters())
        quantized = nf4_linear.block_linear_names(model) if quant == "nf4" else set()
        loaded, tied_copy = set(), None
        for name, tensor in checkpoint.tensors(args, dtype, frozenset(quantized)):
            tensor = tensor.to(device)
            if name == "output.weight" and args.tie_embeddings:
                tied_copy = tensor  # tied to tok_embeddings below; a checkpoint may store it, equal
                continue
            if name not in expected:
                raise UserError(f"{path}: unexpected weight {name!r}; the checkpoint does not match a {args.n_layers}-layer Mistral")
            if tensor.shape != expected[name].shape:
                raise UserError(
                    f"{path}: weight {name} has shape {tuple(tensor.shape)} but config implies {tuple(expected[name].shape)}; "
                    "config and weights do not belong together"
                )
            if isinstance(tensor, nf4.NF4Weight) or name in quantized:
                nf4_linear.load_linear(model, name, tensor, dtype)
            else:
                model.load_state_dict({name: tensor}, strict=False, assign=True)
            loaded.add(name)
        if args.tie_embeddings:
            if tied_copy is not None and not torch.equal(tied_copy, model.tok_embeddings.weight):
                raise UserError(f"{path}: config.json ties lm_head to the embedding, but the checkpoint's lm_head differs; "
                                "config and weights do not belong together")
            model.output.weight = model.tok_embeddings.weight
            loaded.add("output.weight")
        if (path / METADATA_FILE).exists():
            attach(model, DMSConfig.load(path, args))
        missing = sorted(set(expected) - loaded)
        if missing:
            raise UserError(f"{path}: weights missing for {missing[0]} and {len(missing) - 1} more; the checkpoint is incomplete")
        return model.eval()
