"""DMS (Dynamic Memory Sparsification): eviction decisions the model itself emits, per (layer, KV head).

A DMS model borrows one query channel (the last, by default) of the first query head of each GQA group. Its
value x before RoPE gives the eviction logit alpha = x * alpha_scale - alpha_offset, and the channel is zeroed
in the query before and after RoPE, so attention never sees it. As in the reference implementation, the logit
read at token t decides about the key of token t - 1 (one token of lookahead). alpha > 0 (sigmoid > 0.5) means
"evict once it leaves the window": the query at position q sees key k when q - k <= window or k is kept.

The checkpoint is an ordinary model directory plus dms_metadata.json (window_size, alpha_scale, alpha_offset,
borrowed_query_channel, target_compression_ratio, ...), the layout of the published DMS checkpoints.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tinytis.config import ModelArgs
from tinytis.errors import UserError

METADATA_FILE = "dms_metadata.json"
DECISION_SOURCE = "borrowed_query_channel_v1"


@dataclass(frozen=True)
class DMSConfig:
    window_size: int
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    borrowed_query_channel: int = -1  # index into head_dim; -1 = the last channel
    target_compression_ratio: float = 8.0
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # provenance: base model, training, gate

    @classmethod
    def load(cls, model_dir: Path, args: ModelArgs) -> "DMSConfig":
        """dms_metadata.json of a model directory, checked against the model's shape; a UserError if absent or foreign."""
        path = Path(model_dir) / METADATA_FILE
        if not path.is_file():
            raise UserError(f"{model_dir} has no {METADATA_FILE}: policy dms needs a DMS model "
                            "(retrofit one with `python train.py dms`, or pass a published DMS checkpoint)")
        try:
            raw = json.loads(path.read_text())
            raw = raw.get("dms", raw)
            config = cls(int(raw.get("window_size", raw.get("dms_window_size"))),
                         float(raw.get("alpha_scale", raw.get("dms_alpha_scale"))),
                         float(raw.get("alpha_offset", raw.get("dms_alpha_offset"))),
                         int(raw.get("borrowed_query_channel", -1)),
                         float(raw.get("target_compression_ratio", raw.get("target_cr", 0))), raw)
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path} is not a valid DMS metadata file ({type(e).__name__}: {e})")
        if raw.get("decision_source", DECISION_SOURCE) != DECISION_SOURCE:
            raise UserError(f"{path}: decision source {raw['decision_source']!r} is not supported; tinytis reads "
                            "decisions from the borrowed query channel")
        for key, value in (("num_layers", args.n_layers), ("num_q_heads", args.n_heads),
                           ("num_kv_heads", args.n_kv_heads), ("head_dim", args.head_dim)):
            if key in raw and raw[key] != value:
                raise UserError(f"{path} is for {key}={raw[key]} but the model has {value}; it belongs to another model")
        if config.window_size < 1 or not -args.head_dim <= config.borrowed_query_channel < args.head_dim:
            raise UserError(f"{path}: window_size must be >= 1 and borrowed_query_channel within head_dim {args.head_dim}")
        return config

    def save(self, model_dir: Path, args: ModelArgs):
        """Make model_dir (a saved model) a DMS checkpoint in the published layout: dms_metadata.json with the
        model's shape, and the dms_* fields in config.json. Both written atomically."""
        blob = dict(self.extra, schema_version=1, decision_source=DECISION_SOURCE, num_layers=args.n_layers,
                    num_q_heads=args.n_heads, num_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                    **{k: v for k, v in asdict(self).items() if k != "extra"}, zero_borrowed_query_channel=True)
        hf_config = json.loads((Path(model_dir) / "config.json").read_text())
        hf_config.update(dms_window_size=self.window_size, dms_alpha_scale=self.alpha_scale,
                         dms_alpha_offset=self.alpha_offset, dms_cr=self.target_compression_ratio)
        for name, content, indent in ((METADATA_FILE, blob, 1), ("config.json", hf_config, 2)):
            tmp = Path(model_dir) / (name + ".tmp")
            tmp.write_text(json.dumps(content, indent=indent) + "\n")
            os.replace(tmp, Path(model_dir) / name)

    # -- used by the model's attention ------------------------------------------------------------------------------

    def borrow(self, q: torch.Tensor, n_kv_heads: int):
        """q before RoPE: (B, H, T, D) -> (q with the borrowed channel of each group's first head zeroed,
        eviction logits (B, KV, T))."""
        first = q[:, :: q.shape[1] // n_kv_heads]  # (B, KV, T, D)
        logits = first[..., self.borrowed_query_channel] * self.alpha_scale - self.alpha_offset
        return self.zero(q, n_kv_heads), logits

    def zero(self, q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
        """q with the borrowed channel of each group's first head set to 0 (out of place, for autograd)."""
        keep = torch.ones(q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device)
        keep[:: q.shape[1] // n_kv_heads, self.borrowed_query_channel] = 0
        return q * keep[:, None, :]


def attach(model, config: DMSConfig | None):
    """Make every attention layer of model a DMS one (config) or a plain one (None)."""
    for layer in model.layers:
        layer.attention.dms = config
    model.dms = config


class SequenceAttention:
    """DMS attention over whole sequences (positions 0..T-1, right padding), for training and for the strict-mask gate: a cache-shaped object that
    stores nothing. Key k is masked for the query at q when q - k > window and k is evicted, decided by the next
    token's logit: hard (logit > 0, tau=None) or Gumbel-sigmoid relaxed (tau), whose log(1 - alpha) biases the key.

    After a forward, `alpha` holds per layer the eviction probability (or hard decision) of every key (B, KV, T).
    """

    def __init__(self, config: DMSConfig, tau: float | None = None, generator: torch.Generator | None = None):
        self.config, self.tau, self.generator = config, tau, generator

    def begin_forward(self, positions):
        self.positions, self.alpha = positions, []
        distance = positions[:, None, :, None] - positions[:, None, None, :]  # (B, 1, T, T): query - key
        self.far = distance > self.config.window_size
        self.mask = torch.zeros(distance.shape).masked_fill(distance < 0, -math.inf)

    def decide(self, layer, logits):
        self.next_logits = F.pad(logits[..., 1:], (0, 1), value=-math.inf)  # (B, KV, T): the decision about each key

    def attend(self, layer, q, k, v, x=None):
        B, H, T, _ = q.shape
        logits = self.next_logits
        if self.tau is None:
            evict = logits > 0
            self.alpha.append(evict.float())
            bias = torch.zeros_like(logits).masked_fill(evict, -math.inf)
        else:
            u = torch.rand(logits.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6)
            noisy = (logits + torch.log(u) - torch.log1p(-u)) / self.tau
            self.alpha.append(torch.sigmoid(noisy))
            bias = F.logsigmoid(-noisy)  # log(1 - alpha)
        bias = bias.repeat_interleave(H // k.shape[1], dim=1)[:, :, None, :]  # (B, H, 1, T)
        mask = self.mask + torch.where(self.far, bias, torch.zeros((), dtype=bias.dtype))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
