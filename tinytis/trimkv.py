"""TRIM-KV retention gates: how long each token is worth keeping, predicted once, when the token is created.

  log beta_i = logsigmoid(W2 silu(W1 x_i + b1) + b)      per layer, one value per KV head
  alpha_ti   = beta_i^(t - i)                            the token's retention at time t; score = log alpha_ti

x_i is token i's normed input to the layer's attention (the hidden state after input_layernorm). A head that holds
more than it may keeps the tokens with the highest alpha (policies/trimkv.py).

Training (`python train.py trimkv`) keeps the model frozen, as ERT does for TIS (tinytis/ert.py). A context is
prefilled with the full cache, as at inference, where this engine compresses after the prefill; the question and
answer that follow attend to each context key i with log alpha_Ci = (C - i) log beta_i added to their logits (C the
compression time), so a token fades out of attention as it would fade out of the cache. Loss = KL(full || gated) +
next-token loss over the continuation + capacity loss: the mean over (layer, KV head, time t) of
max(0, sum_i alpha_ti - M) / M, a head may hold M tokens' worth of retention. (The paper gates every query of the
sequence, and its eager code scales the logits by alpha instead of adding log alpha: a logit scaled to 0 still
leaves the token exp(0) of weight, which does not train for eviction.)

Files, both loaded with the same tensor names, model.layers.{i}.self_attn.retention_gate.{linear1.weight,
linear1.bias, linear2.weight, bias}:
  trimkv_gates.safetensors   written by train.py beside the model; metadata "meta" (JSON): shape, memory_size...
  trimkv_weights.pth         a published TRIM-KV checkpoint (torch state dict), its config.json naming
                             retention_gate "rg", retention_gate_intermediate_size, memory_size and buffer_size
"""
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinytis.config import ModelArgs
from tinytis.errors import UserError
from tinytis.ert import ContextKV

GATES_FILE = "trimkv_gates.safetensors"
PUBLISHED_FILE = "trimkv_weights.pth"
PARAM_NAME = "model.layers.{}.self_attn.retention_gate.{}"
PARAMS = ("linear1.weight", "linear1.bias", "linear2.weight", "bias")


class RetentionGate(nn.Module):
    """One layer's gate: x (B, T, dim) -> log beta (B, KV, T)."""

    def __init__(self, dim: int, hidden: int, n_kv_heads: int, bias_init: float):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, n_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.full((n_kv_heads,), float(bias_init)))

    def forward(self, x):
        return F.logsigmoid(self.linear2(F.silu(self.linear1(x))) + self.bias).transpose(1, 2)


class RetentionGates(nn.Module):
    """The gates of every layer, and what they were trained for (meta: memory_size, buffer_size, ...)."""

    def __init__(self, args: ModelArgs, hidden: int, bias_init: float = 10.0, meta: dict | None = None, seed: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(RetentionGate(args.dim, hidden, args.n_kv_heads, bias_init) for _ in range(args.n_layers))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the published initialisation: N(0, 0.02) weights, zero hidden bias
            for gate in self.layers:
                for w in (gate.linear1.weight, gate.linear2.weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.02)
                gate.linear1.bias.zero_()
        self.meta = dict(meta or {}, hidden_size=args.dim, n_layers=args.n_layers, n_kv_heads=args.n_kv_heads,
                         intermediate_size=hidden)

    def log_beta(self, layer: int, x) -> torch.Tensor:
        """x: (B, T, dim) the layer's normed attention input -> log beta (B, KV, T), <= 0."""
        gate = self.layers[layer]
        return gate(x.to(gate.bias.dtype))

    def all_log_beta(self, inputs: list) -> torch.Tensor:
        """Every layer's inputs (B, T, dim) -> log beta (L, B, KV, T)."""
        return torch.stack([self.log_beta(layer, x) for layer, x in enumerate(inputs)])

    def named_tensors(self) -> dict:
        return {PARAM_NAME.format(i, p): gate.get_parameter(p).detach().contiguous()
                for i, gate in enumerate(self.layers) for p in PARAMS}

    def save(self, path: Path):
        """Write trimkv_gates.safetensors atomically (temp file + rename)."""
        tmp = Path(str(path) + ".tmp")
        save_file(self.named_tensors(), tmp, metadata={"meta": json.dumps(self.meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, model_dir: Path, args: ModelArgs) -> "RetentionGates":
        """The gates beside a model: ours (trimkv_gates.safetensors) or a published checkpoint's; else a UserError."""
        model_dir = Path(model_dir)
        if (model_dir / GATES_FILE).exists():
            tensors, meta = read_gates_file(model_dir / GATES_FILE)
        elif (model_dir / PUBLISHED_FILE).exists():
            tensors, meta = read_published(model_dir)
        else:
            raise UserError(f"{model_dir} has no TRIM-KV retention gates ({GATES_FILE}, or {PUBLISHED_FILE} of a "
                            "published TRIM-KV checkpoint); train them with `python train.py trimkv` or choose another --policy")
        expected = {PARAM_NAME.format(i, p) for i in range(args.n_layers) for p in PARAMS}
        if set(tensors) != expected:
            wrong = sorted(set(tensors) ^ expected)
            raise UserError(f"{model_dir}: the retention gates do not match a {args.n_layers}-layer model "
                            f"({wrong[0]} and {len(wrong) - 1} more differ)")
        hidden = tensors[PARAM_NAME.format(0, "linear1.weight")].shape[0]
        gates = cls(args, hidden, meta=meta)
        for name, value in gates.named_tensors().items():
            if tensors[name].shape != value.shape:
                raise UserError(f"{model_dir}: retention gate {name} has shape {tuple(tensors[name].shape)}, the model "
                                f"needs {tuple(value.shape)}; the gates were trained for another model")
        gates.load_state_dict({f"layers.{name.split('.')[2]}.{name.split('retention_gate.')[1]}": t.float()
                               for name, t in tensors.items()})
        return gates.eval()


def read_gates_file(path: Path):
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; retrain it with `python train.py trimkv`")


def read_published(model_dir: Path):
    """A published TRIM-KV checkpoint: gate tensors from trimkv_weights.pth, memory settings from config.json."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{model_dir}/config.json is needed beside {PUBLISHED_FILE} and cannot be read ({e})")
    if config.get("retention_gate") != "rg":
        raise UserError(f"{model_dir}: retention_gate {config.get('retention_gate')!r} in config.json; tinytis runs the "
                        "'rg' gates (an MLP on the layer's normed hidden state)")
    try:
        tensors = torch.load(model_dir / PUBLISHED_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"{model_dir / PUBLISHED_FILE} is not a readable state dict ({type(e).__name__})")
    meta = {k: config[k] for k in ("memory_size", "buffer_size", "base_model") if k in config}
    return dict(tensors), meta


class GatedContextKV(ContextKV):
    """ContextKV that also keeps each layer's normed input of the context, from which the gates read beta."""

    def __init__(self):
        super().__init__()
        self.inputs = []  # per layer: (B, C, dim)

    def attend(self, layer, q, k, v, x=None):
        if self.filling:
            self.inputs.append(x)
        return super().attend(layer, q, k, v)


def compression_log_alpha(log_beta, ctx_pos) -> torch.Tensor:
    """log alpha of every context key at the compression time t = context length: log_beta (L, B, KV, C) ->
    (L, B, KV, C), -inf for padding. ctx_pos: (B, C) left-padded positions, -1 for padding."""
    age = (ctx_pos.max(dim=1, keepdim=True).values + 1 - ctx_pos)[None, :, None, :]  # (1, B, 1, C)
    return (age * log_beta).masked_fill((ctx_pos < 0)[None, :, None, :], float("-inf"))


def capacity_loss(log_beta, ctx_pos, memory_size: int, stride: int = 32) -> torch.Tensor:
    """Mean over layers, KV heads and query times t (every stride-th context position and the compression time) of
    max(0, sum_{i <= t} beta_i^(t - i) - M) / M. log_beta: (L, B, KV, C); ctx_pos: (B, C), -1 for padding."""
    length = ctx_pos.max(dim=1, keepdim=True).values + 1  # (B, 1)
    t = torch.cat([torch.arange(stride - 1, ctx_pos.shape[1], stride), torch.tensor([ctx_pos.shape[1]])])
    t = torch.minimum(t[None, :], length)  # (B, Q) query positions, the last one the compression time
    age = t[:, :, None] - ctx_pos[:, None, :]  # (B, Q, C)
    held = (age >= 0) & (ctx_pos >= 0)[:, None, :]
    alpha = (age.clamp(min=0)[None, :, None] * log_beta[:, :, :, None, :]).exp() * held[None, :, None]  # (L, B, KV, Q, C)
    return ((alpha.sum(-1) - memory_size).clamp(min=0) / memory_size).mean()
