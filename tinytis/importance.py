"""Token Importance Scoring (TIS): a learned score for every cached token, per (layer, KV head).

score(token i) = ImportanceHead(h_i) + ImportanceEmbedding[id_i]

By default the head has one output per (layer, KV head); with per_head=False it has one output per
token that every layer and head share (the single-logit head of the TIS cards).

h_i is the base model's final hidden state at token i. The model is causal, so h_i has seen only
the tokens up to i: scoring a context cannot peek at a question that comes after it. The scores
rank tokens within each (layer, KV head); the cache manager keeps the top ones plus the anchors.

Saved as tis_components.pt = {'importance_embedding': state_dict, 'importance_head': state_dict,
'attn_hook_lambda': float, 'meta': {...}}, the layout of the TIS model cards. meta['anchors'] =
{'n_sink', 'n_recent', 'max_share'}: the anchors the head was trained with (tinytis.anchors.Anchors), which
evaluation applies too; a file from before the share rule has no 'max_share' and is read with 1.0 (its anchors
took what the budget allowed, as when it was trained).
"""
import os
from pathlib import Path

import torch
import torch.nn as nn

from tinytis.anchors import ANCHOR_SHARE
from tinytis.config import ModelArgs
from tinytis.errors import UserError
from tinytis.model import RMSNorm

COMPONENTS_FILE = "tis_components.pt"


class ImportanceHead(nn.Module):
    """RMSNorm(h) -> Linear -> SiLU -> Linear: n_outputs logits for each token."""

    def __init__(self, dim: int, n_outputs: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, n_outputs)

    def forward(self, h):  # h: (B, T, dim) -> (B, T, n_outputs)
        return self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class TIS(nn.Module):
    """The trained components: importance head, importance embedding (a per-vocabulary-id bias), lambda."""

    def __init__(self, args: ModelArgs, attn_hook_lambda: float = 1.0, meta: dict | None = None, per_head: bool = True):
        super().__init__()
        self.n_layers, self.n_kv_heads = args.n_layers, args.n_kv_heads
        n_out = args.n_layers * args.n_kv_heads if per_head else 1
        self.importance_head = ImportanceHead(args.dim, n_out, args.norm_eps)
        self.importance_embedding = nn.Embedding(args.vocab_size, n_out)
        nn.init.zeros_(self.importance_embedding.weight)
        self.attn_hook_lambda = attn_hook_lambda
        self.meta = dict(meta or {}, hidden_size=args.dim, vocab_size=args.vocab_size,
                         n_layers=args.n_layers, n_kv_heads=args.n_kv_heads, per_head=per_head)
        if "anchors" in self.meta:
            self.meta["anchors"] = {"max_share": ANCHOR_SHARE, **self.meta["anchors"]}

    def forward(self, hidden, ids):
        """hidden: (B, T, dim), ids: (B, T) -> scores (B, n_layers, n_kv_heads, T); higher = keep."""
        s = self.importance_head(hidden.to(self.importance_head.fc1.weight.dtype)) + self.importance_embedding(ids)
        B, T, n_out = s.shape
        if n_out == 1:  # one shared score per token: s (B, T, 1) -> (B, L, KV, T), a broadcast view
            return s.view(B, 1, 1, T).expand(B, self.n_layers, self.n_kv_heads, T)
        return s.view(B, T, self.n_layers, self.n_kv_heads).permute(0, 2, 3, 1)

    def save(self, path: Path):
        """Write tis_components.pt atomically (temp file + rename)."""
        blob = {"importance_embedding": self.importance_embedding.state_dict(),
                "importance_head": self.importance_head.state_dict(),
                "attn_hook_lambda": float(self.attn_hook_lambda), "meta": self.meta}
        tmp = Path(str(path) + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, args: ModelArgs) -> "TIS":
        """Load tis_components.pt for a model of shape `args`; a missing, foreign or mismatched file is a UserError."""
        if not path.exists():
            raise UserError(f"{path} not found; train it with `python train.py ert` or choose another --policy")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a file that is not a checkpoint
            raise UserError(f"{path} is not a readable tis_components.pt ({type(e).__name__}); retrain it with `python train.py ert`")
        missing = {"importance_embedding", "importance_head", "attn_hook_lambda", "meta"} - set(blob if isinstance(blob, dict) else ())
        if missing:
            raise UserError(f"{path} lacks {sorted(missing)}; it is not a tis_components.pt file")
        meta = blob["meta"]
        if "anchors" in meta:
            meta["anchors"] = {"max_share": 1.0, **meta["anchors"]}  # written before the share rule
        expected = {"hidden_size": args.dim, "vocab_size": args.vocab_size, "n_layers": args.n_layers, "n_kv_heads": args.n_kv_heads}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise UserError(f"{path} was trained for {key}={meta.get(key)} but the model has {value}; "
                                "use the components trained for this model")
        tis = cls(args, blob["attn_hook_lambda"], meta, per_head=meta.get("per_head", True))
        tis.importance_head.load_state_dict(blob["importance_head"])
        tis.importance_embedding.load_state_dict(blob["importance_embedding"])
        return tis.eval()
