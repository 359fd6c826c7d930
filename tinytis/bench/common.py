"""Helpers shared by the benchmarks: random-weight checkpoints of a given shape and the flags that give it."""
from pathlib import Path

import torch

from tinytis.config import ModelArgs
from tinytis.model import Transformer
from tinytis.weights import save_hf

SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")


def add_shape_flags(p, dtype_flag: bool = True, **defaults):
    """--dim, --n-layers, ... of a random model (defaults: the shape) and, with dtype_flag, its --dtype."""
    for name in SHAPE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    if dtype_flag:
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def model_args(a) -> ModelArgs:
    return ModelArgs(**{name: getattr(a, name) for name in SHAPE_FLAGS}, max_seq_len=32768)


def random_checkpoint(args: ModelArgs, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """An HF-layout checkpoint of random weights (tinytis' training init) stored in dtype."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu")  # skip nn.Linear's own (slow) initialisation
    model.init_weights(seed)
    save_hf({k: v.to(dtype) for k, v in model.state_dict().items()}, path, args)
    return path


def describe(args: ModelArgs, dtype: str) -> str:
    n = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim + args.n_layers * (
        2 * args.dim + args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * args.dim * args.hidden_dim
    )
    return (
        f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} KV) of {args.head_dim}, "
        f"hidden {args.hidden_dim}, vocab {args.vocab_size}: {n / 1e6:.1f}M parameters, {dtype}"
    )
