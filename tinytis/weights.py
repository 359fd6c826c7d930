"""Find a checkpoint, read its safetensors lazily, and map tensor names to tinytis' own.

tinytis names parameters as the consolidated (Mistral reference) layout does and rotates RoPE by
halves as HF does. So HF checkpoints only need their names mapped, while consolidated checkpoints
keep their names and have the rows of wq/wk permuted from interleaved pairs to halves.
"""
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinytis import nf4
from tinytis.config import ModelArgs
from tinytis.errors import UserError

# HF name -> tinytis name; {} is the layer index.
HF_TO_TINYTIS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
TINYTIS_TO_HF = {v: k for k, v in HF_TO_TINYTIS.items()}


def _rename(name: str, table: dict) -> str | None:
    """Map one tensor name through a table whose keys use {} for the layer index."""
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer.group(1)}.", ".{}.", 1) if layer else name
    target = table.get(key)
    return target.format(layer.group(1)) if target and layer else target


def hf_to_tinytis(name: str) -> str | None:
    return _rename(name, HF_TO_TINYTIS)


def tinytis_to_hf(name: str) -> str:
    return _rename(name, TINYTIS_TO_HF)


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute wq/wk rows from RoPE on pairs (2i, 2i+1) to RoPE on halves (i, i + D/2)."""
    dim1, dim2 = w.shape
    # w: (n_heads, D/2, 2, dim2) -> (n_heads, 2, D/2, dim2)
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; anything else is a hub id looked up in huggingface_hub's local cache."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.count("/") != 1:
        raise UserError(f"--model {model!r} is not a model directory or a hub id like 'mistralai/Mistral-7B-v0.3'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise UserError(
            f"{model!r} is not in the local Hugging Face cache and tinytis does not download; "
            f"fetch it first with `huggingface-cli download {model}` on a connected machine, or pass a local directory"
        )


class Checkpoint:
    """The safetensors files of one model directory, read one tensor at a time (mmap)."""

    def __init__(self, path: Path):
        self.path = path
        index_file = path / "model.safetensors.index.json"
        if index_file.exists():
            try:
                files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index_file} is not a valid shard index ({type(e).__name__}: {e}); download it again")
            self.layout = "hf"
        elif (path / "model.safetensors").exists():
            files, self.layout = ["model.safetensors"], "hf"
        elif (path / "consolidated.safetensors").exists():
            files, self.layout = ["consolidated.safetensors"], "consolidated"
        else:
            raise UserError(f"{path} has no model.safetensors, sharded index or consolidated.safetensors; it holds no weights")
        self.files = [path / f for f in files]
        missing = [f.name for f in self.files if not f.exists()]
        if missing:
            raise UserError(f"{path}: shard {missing[0]} named by the index is missing ({len(missing)} missing); download it again")

    def tensors(self, args: ModelArgs, dtype: torch.dtype | None = None):
        """Yield (tinytis name, tensor) for every weight, in dtype (default: as stored), converted to
        tinytis' RoPE convention.

        Each tensor is copied out of a mapping opened for it alone: the file pages it touched leave
        the resident set when that mapping closes, so loading holds about one copy of the model.
        """
        for file in self.files:
            with _open(file) as f:
                names = list(f.keys())
            for name in names:
                if name.endswith(nf4.BNB_SUFFIXES):
                    continue  # the quantization state of an NF4 weight, read with the weight
                with _open(file) as f:
                    tensor = _read(f, name, names, dtype)
                yield from self._convert(name, tensor, args)

    def _convert(self, name: str, tensor: torch.Tensor, args: ModelArgs):
        if self.layout == "hf":
            if not name.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta, not loaded
                yield hf_to_tinytis(name) or name, tensor  # an unknown name is reported by the caller
            return
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_halves(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_halves(tensor, args.n_kv_heads)
        yield name, tensor


def _read(f, name: str, names: list, dtype: torch.dtype | None):
    """A copy of one tensor in dtype; for a weight saved in NF4 by transformers + bitsandbytes, its NF4Weight as stored."""
    if name + nf4.BNB_SUFFIXES[-1] not in names:
        tensor = f.get_tensor(name)
        return tensor.to(dtype or tensor.dtype, copy=True)
    parts = {s: f.get_tensor(name + s).clone() for s in ("",) + nf4.BNB_SUFFIXES if name + s in names}
    return nf4.NF4Weight.from_bnb(parts, name)


@contextmanager
def _open(file: Path):
    """safe_open, with a broken file reported as a UserError."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {file}: {e}; the file is truncated or corrupt, download it again")


def save_hf(state_dict: dict, path: Path, args: ModelArgs):
    """Write a tinytis state dict as an HF-layout model directory (config.json + model.safetensors), atomically."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {tinytis_to_hf(k): v.contiguous() for k, v in state_dict.items()}
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(args.to_hf_config(), indent=2) + "\n")
    os.replace(tmp, path / "config.json")
