"""`bench.py load`: load a random-weight checkpoint of a real model's shape in NF4, then prefill and decode on it.

The checkpoint is written once into a cache directory in the hub's sharded layout (bf16 shards,
model.safetensors.index.json, config.json, a sentencepiece tokenizer with its tokenizer.json), streamed tensor by
tensor, so a 7B checkpoint (14.5 GB) never sits in memory. Each loader runs in a fresh process: tinytis (--quant
nf4) and, where installed, transformers + bitsandbytes (NF4 on CPU) on the same files; the latter is stopped, and
said not to fit, if its resident memory would pass --peer-limit-gib.
"""
import io
import json
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

from tinytis.bench.common import add_shape_flags, describe, model_args, random_checkpoint
from tinytis.config import MISTRAL_7B_V03, ModelArgs
from tinytis.hf_tokenizer import write_hf_tokenizer
from tinytis.model import Transformer
from tinytis.weights import tinytis_to_hf

SHAPES = {"mistral-7b-v0.3": MISTRAL_7B_V03}
SHARD_BYTES = 2 << 30  # the writer holds one tensor at a time; shards only bound the file size
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
PROMPT, NEW_TOKENS = 128, 8


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinytis" / "random-checkpoints"


def hf_tensor_shapes(args: ModelArgs) -> list[tuple[str, torch.Size]]:
    """(HF name, shape) of every weight of a model of this shape, in the model's order."""
    with torch.device("meta"):
        model = Transformer(args)
    named = [(tinytis_to_hf(k), v.shape) for k, v in model.state_dict().items()]
    return [(k, s) for k, s in named if not (args.tie_embeddings and k == "lm_head.weight")]


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Norm weights 1, the rest N(0, 0.02) (tinytis' training init), seeded per tensor."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_safetensors(path: Path, items: list[tuple[str, torch.Size]], make, dtype: torch.dtype):
    """A safetensors file written one tensor at a time: the header first (offsets follow from the shapes), then each
    tensor's bytes as make(name, shape) returns it."""
    size = torch.tensor([], dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        n = shape.numel() * size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in items:
            f.write(make(name, shape).contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def random_tokenizer(out: Path, vocab_size: int, max_seq_len: int, seed: int):
    """A sentencepiece BPE tokenizer of exactly vocab_size pieces (byte fallback) trained on random words, so every
    id the random model emits decodes; tokenizer.json and the HF tokenizer configs beside it."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(60000)]
    lines = [" ".join(rng.choices(words, k=12)) for _ in range(40000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=2, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    write_hf_tokenizer(out, max_seq_len)


def random_sharded_checkpoint(args: ModelArgs, path: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                              shard_bytes: int = SHARD_BYTES) -> Path:
    """The hub's sharded layout of random weights: model-0000i-of-0000n.safetensors, model.safetensors.index.json,
    config.json and a tokenizer. The index is written last: a directory that has it is complete and is reused."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    size = torch.tensor([], dtype=dtype).element_size()
    shards, current = [[]], 0
    for name, shape in hf_tensor_shapes(args):
        n = shape.numel() * size
        if shards[-1] and current + n > shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append((name, shape))
        current += n
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / file, items, lambda name, shape: random_tensor(name, shape, dtype, seed), dtype)
        weight_map |= {name: file for name, _ in items}
        total += sum(shape.numel() * size for _, shape in items)
    config = args.to_hf_config() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    random_tokenizer(path, args.vocab_size, args.max_seq_len, seed)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = index_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, index_file)
    return path


def available_bytes() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemAvailable:"))


def largest_tensor_bytes(path: Path) -> int:
    args = ModelArgs.from_dir(path)
    return max(shape.numel() for _, shape in hf_tensor_shapes(args)) * 2  # bf16


# -- the measured processes ------------------------------------------------------------------------------------------


def _kib(field: str) -> int:
    """A field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _load_in_this_process(path: str, dtype: str) -> dict:
    """Load a checkpoint and touch every weight; report RSS before, at its peak, and after, in bytes."""
    args = ModelArgs.from_dir(Path(path))
    with torch.device("meta"):
        Transformer(args)  # torch's meta-device machinery loads here, before the baseline
    base = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    model = Transformer.from_pretrained(Path(path), getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():  # resident for sure, whatever the loader mapped lazily
            p.sum()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(base=base * 1024, peak=_kib("VmHWM") * 1024, final=_kib("VmRSS") * 1024, weights=weights)


def rss() -> int:
    """The resident set of this process now, in bytes."""
    return _kib("VmRSS") * 1024


def measure_dense_load(args: ModelArgs, dtype: str, file_dtype: torch.dtype = torch.float32) -> dict:
    """Peak RSS growth of a fresh process loading a random checkpoint (stored in file_dtype) into dtype, unquantized."""
    with tempfile.TemporaryDirectory() as d:
        random_checkpoint(args, Path(d), file_dtype)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_load_in_this_process, (d, dtype))


def peak_rss() -> int:
    """The peak resident set of this process in bytes (VmHWM: every page it had resident, file-backed included).
    ru_maxrss would be the same figure but for a child of a larger parent: Linux carries the parent's peak into it
    across fork and exec, so the writer's memory would count as the loader's."""
    return _kib("VmHWM") * 1024


def run_tinytis(path: Path, threads: int) -> dict:
    from tinytis import nf4_linear
    from tinytis.engine import SamplingParams, generate

    torch.set_num_threads(threads)
    with torch.device("meta"):
        Transformer(ModelArgs.from_dir(path))  # torch's meta-device machinery loads here, before the baseline
    base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    model = Transformer.from_pretrained(path, torch.bfloat16, quant="nf4")
    out = {"load_s": time.perf_counter() - t0, "base_rss": base, "load_peak_rss": peak_rss(),
           "bytes_held": nf4_linear.weight_bytes(model)}
    prompt = torch.randint(3, model.args.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = generate(model, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS))
    return out | {"prefill_tok_s": PROMPT / gen.prefill_s, "decode_tok_s": gen.new_tokens / gen.decode_s,
                  "peak_rss": peak_rss()}


@torch.inference_mode()
def run_transformers(path: Path, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(threads)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu")
    out = {"load_s": time.perf_counter() - t0, "base_rss": 0, "load_peak_rss": peak_rss(),
           "bytes_held": model.get_memory_footprint()}
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    step = model(ids, use_cache=True, logits_to_keep=1)
    prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        step = model(step.logits[:, -1:].argmax(-1), past_key_values=step.past_key_values, use_cache=True)
    decode_s = time.perf_counter() - t0
    return out | {"prefill_tok_s": PROMPT / prefill_s, "decode_tok_s": NEW_TOKENS / decode_s, "peak_rss": peak_rss()}


RUNNERS = {"tinytis": run_tinytis, "transformers": run_transformers}


def measure(engine: str, path: Path, threads: int, limit_bytes: int | None = None) -> dict:
    """Run one engine in a fresh process (python -m tinytis.bench.load ENGINE PATH THREADS); stop it if its
    resident set passes limit_bytes. -> its figures, or {"error": why}."""
    proc = subprocess.Popen([sys.executable, "-m", "tinytis.bench.load", engine, str(path), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        time.sleep(0.2)
        try:
            rss = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        if limit_bytes is not None and rss > limit_bytes:
            proc.kill()
            proc.wait()
            return {"error": f"stopped at {rss / 2**30:.1f} GiB resident, past the {limit_bytes / 2**30:.1f} GiB limit"}
    stdout, stderr = proc.communicate()
    if proc.returncode:
        return {"error": (stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    return json.loads(stdout.strip().splitlines()[-1])


def add_flags(p):
    p.add_argument("--shape", choices=list(SHAPES), help="a real model's shape (default: the shape flags)")
    add_shape_flags(p, dtype_flag=False, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, head_dim=64, hidden_dim=2048,
                    vocab_size=32768)
    p.add_argument("--cache-dir", help=f"where the checkpoint is written once (default: {default_cache_dir()})")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip transformers + bitsandbytes")
    p.add_argument("--peer-limit-gib", type=float, default=None,
                   help="stop a loader whose resident memory passes this, and report that it did not fit "
                        "(default: 60%% of the memory available when the benchmark starts)")


def load(a):
    args = SHAPES[a.shape] if a.shape else model_args(a)
    name = a.shape or f"d{args.dim}-l{args.n_layers}-h{args.n_heads}-kv{args.n_kv_heads}-f{args.hidden_dim}-v{args.vocab_size}"
    path = Path(a.cache_dir or default_cache_dir()) / f"{name}-bf16-seed0"
    print(f"checkpoint: {path}" + (" (cached)" if (path / "model.safetensors.index.json").exists() else " (writing it once)"))
    t0 = time.perf_counter()
    random_sharded_checkpoint(args, path)
    print(f"  ready in {time.perf_counter() - t0:.0f} s; " + describe(args, "bfloat16 on disk"))
    largest = largest_tensor_bytes(path)
    limit = int(a.peer_limit_gib * 2**30) if a.peer_limit_gib else int(0.6 * available_bytes())
    results = {"tinytis": measure("tinytis", path, a.threads, limit)}
    results["transformers"] = measure("transformers", path, a.threads, limit) if a.peers else {"error": "--no-peers"}
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    print(f"prompt {PROMPT} tokens, {NEW_TOKENS} new tokens (greedy), {a.threads} threads, each engine in a fresh process")
    print(f"{'':<30}{'load s':>8}{'NF4 bytes held':>16}{'peak RSS load':>15}{'peak RSS run':>14}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for engine, r in results.items():
        label = engine if engine == "tinytis" else "transformers + bitsandbytes"
        if "error" in r:
            print(f"{label:<30}did not run: {r['error']}")
            continue
        print(f"{label:<30}{r['load_s']:>8.1f}{gib(r['bytes_held']):>16}{gib(r['load_peak_rss']):>15}"
              f"{gib(r['peak_rss']):>14}{r['prefill_tok_s']:>15.2f}{r['decode_tok_s']:>14.3f}")
    ours = results["tinytis"]
    if "error" not in ours:
        bound = 1.15 * ours["bytes_held"] + largest
        for what, peak in (("peak RSS while loading (VmHWM)", ours["load_peak_rss"]),
                           ("its growth over the RSS before loading", ours["load_peak_rss"] - ours["base_rss"])):
            print(f"bound: {what} {gib(peak)} <= 1.15 x NF4 bytes held + largest bf16 tensor ({gib(largest)}) "
                  f"= {gib(bound)}: {'met' if peak <= bound else 'NOT met'}")
    print("json: " + json.dumps({"largest_tensor": largest, **results}))


if __name__ == "__main__":  # the measured process: python -m tinytis.bench.load ENGINE PATH THREADS
    print(json.dumps(RUNNERS[sys.argv[1]](Path(sys.argv[2]), int(sys.argv[3]))))
