"""Find a checkpoint, read its safetensors lazily, and map tensor names to tinytis' own.

tinytis names parameters as the consolidated (Mistral reference) layout does and rotates RoPE by
halves as HF does. So HF checkpoints only need their names mapped, while consolidated checkpoints
keep their names and have the rows of wq/wk permuted from interleaved pairs to halves.
"""
import json
import os
import re
import struct
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
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


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

    def tensors(self, args: ModelArgs, dtype: torch.dtype | None = None, quantized: frozenset = frozenset()):
        """Yield (tinytis name, tensor) for every weight, in dtype (default: as stored), converted to
        tinytis' RoPE convention; the weights named in `quantized` as NF4Weights, quantized as they arrive.

        safetensors' own parser validates each file's header; the tensors are then read with plain file
        reads, one at a time, never memory-mapped, so no page of the file stays in the resident set and
        loading holds the loaded model plus the one tensor in flight. Every weight is checked finite.
        """
        for file in self.files:
            with _open(file) as f:
                names = list(f.keys())
            header, data_start = _header(file)
            for name in names:
                if name.endswith(nf4.BNB_SUFFIXES):
                    continue  # the quantization state of an NF4 weight, read with the weight
                if name + nf4.BNB_SUFFIXES[-1] in names:
                    with _open(file) as f:
                        parts = {s: f.get_tensor(name + s).clone() for s in ("",) + nf4.BNB_SUFFIXES if name + s in names}
                    tensor = nf4.NF4Weight.from_bnb(parts, name)
                else:
                    tensor = _read(file, name, header[name], data_start, dtype)
                for n, t in self._convert(name, tensor, args):
                    yield n, _own(n, t, n in quantized, file)

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


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors header (already validated by safe_open) and where the data starts."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _read(file: Path, name: str, entry: dict, data_start: int, dtype: torch.dtype | None) -> torch.Tensor:
    """One float tensor, read from the file into memory of its own, in dtype (default: as stored); a conversion
    goes through one chunk at a time, so it never holds the tensor twice."""
    stored = SAFETENSORS_DTYPES.get(entry["dtype"])
    if stored is None or not stored.is_floating_point:
        raise UserError(f"{file}: weight {name} is stored as {entry['dtype']}, not a float type tinytis loads; "
                        "the file is corrupt or not a model's weights")
    out = torch.empty(entry["shape"], dtype=dtype or stored)
    flat = out.view(-1)
    with open(file, "rb") as f:
        f.seek(data_start + entry["data_offsets"][0])
        if out.dtype == stored:
            f.readinto(flat.view(torch.uint8).numpy())
            return out
        for start in range(0, flat.numel(), nf4.QUANT_CHUNK):
            chunk = torch.empty(min(nf4.QUANT_CHUNK, flat.numel() - start), dtype=stored)
            f.readinto(chunk.view(torch.uint8).numpy())
            flat[start : start + chunk.numel()] = chunk
    return out


def _own(name: str, tensor, quantize: bool, file: Path):
    """A tensor as loaded: quantized to NF4 if asked; a non-finite value (a corrupt file) is a UserError."""
    if isinstance(tensor, nf4.NF4Weight):
        return tensor
    if quantize:  # nan or inf in a block makes its absmax, and so their mean (the double-quant offset), non-finite
        tensor = nf4.quantize(tensor)
        finite = tensor.absmax.isfinite().all() if tensor.nested_absmax is None else tensor.offset.isfinite()
    else:
        finite = all(chunk.isfinite().all() for chunk in tensor.view(-1).split(nf4.QUANT_CHUNK))
    if not finite:
        raise UserError(f"{file}: weight {name} holds non-finite values (inf or nan); the file is corrupt, download it again")
    return tensor


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
