"""Speed and memory of tinytis, side by side with transformers where it is installed.

    python bench.py speed    prefill and decode tokens/s of tinytis and transformers on the same random weights
    python bench.py load     peak RSS while loading a random-weight checkpoint, against the loaded weights' size

Every subcommand builds its model from the shape flags (random weights, HF layout in a temporary directory).
"""
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, generate
from tinytis.errors import ArgumentParser, UserError, run_cli
from tinytis.model import Transformer
from tinytis.weights import save_hf

SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")


def add_shape_flags(p, **defaults):
    for name in SHAPE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
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


# -- speed ----------------------------------------------------------------------------------------------------------


def tinytis_speed(path: Path, dtype: torch.dtype, prompt: list[int], new_tokens: int):
    """(prefill tok/s, decode tok/s, last-position prefill logits) of one greedy run after a short warm-up."""
    model = Transformer.from_pretrained(path, dtype)
    generate(model, [prompt[:16]], SamplingParams(max_new_tokens=4))
    gen = generate(model, [prompt], SamplingParams(max_new_tokens=new_tokens))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0, -1]
    return len(prompt) / gen.prefill_s, gen.new_tokens / gen.decode_s, logits


@torch.inference_mode()
def transformers_speed(path: Path, dtype: torch.dtype, prompt: list[int], new_tokens: int):
    """The same greedy run with transformers' own KV cache, timed the same way as tinytis.engine.generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def run(ids, n):
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        logits, past = out.logits[:, -1].float(), out.past_key_values
        prefill_s = time.perf_counter() - t0
        first = logits[0]
        t0 = time.perf_counter()
        for step in range(n):
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            if step == n - 1:
                break
            out = model(nxt, past_key_values=past, use_cache=True)
            logits, past = out.logits[:, -1].float(), out.past_key_values
        return prefill_s, time.perf_counter() - t0, first

    run(prompt[:16], 4)
    prefill_s, decode_s, logits = run(prompt, new_tokens)
    return len(prompt) / prefill_s, new_tokens / decode_s, logits


def speed(a):
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("bench.py speed compares against transformers, which is not installed: pip install -e '.[test]'")
    torch.set_num_threads(a.threads)
    args, dtype = model_args(a), getattr(torch, a.dtype)
    prompt = torch.randint(3, args.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as d:
        path = random_checkpoint(args, Path(d))
        ours = tinytis_speed(path, dtype, prompt, a.new_tokens)
        theirs = transformers_speed(path, dtype, prompt, a.new_tokens)
    print(describe(args, a.dtype))
    print(f"prompt {a.prompt_len} tokens, {a.new_tokens} new tokens (greedy), {a.threads} threads, one run each after a warm-up")
    print(f"same weights: max |logit diff| at the last prompt position {(ours[2] - theirs[2]).abs().max().item():.2e}")
    print(f"{'':<24}{'prefill tok/s':>15}{'decode tok/s':>15}")
    print(f"{'tinytis':<24}{ours[0]:>15.1f}{ours[1]:>15.1f}")
    print(f"{'transformers':<24}{theirs[0]:>15.1f}{theirs[1]:>15.1f}")
    print(f"{'tinytis / transformers':<24}{ours[0] / theirs[0]:>14.2f}x{ours[1] / theirs[1]:>14.2f}x")


# -- load -----------------------------------------------------------------------------------------------------------


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


def measure_load(args: ModelArgs, dtype: str, file_dtype: torch.dtype = torch.float32) -> dict:
    """Peak RSS growth of a fresh process loading a random checkpoint (stored in file_dtype) into dtype."""
    with tempfile.TemporaryDirectory() as d:
        random_checkpoint(args, Path(d), file_dtype)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_load_in_this_process, (d, dtype))


def load(a):
    args = model_args(a)
    m = measure_load(args, a.dtype, getattr(torch, a.file_dtype))
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    print(describe(args, a.dtype) + f", stored as {a.file_dtype}")
    print(f"weights loaded        {mib(m['weights'])}")
    print(f"RSS before loading    {mib(m['base'])} (interpreter and torch)")
    print(f"peak RSS while loading {mib(m['peak'])}: +{mib(m['peak'] - m['base'])} = {(m['peak'] - m['base']) / m['weights']:.2f}x the weights")
    print(f"RSS after loading     {mib(m['final'])}: +{mib(m['final'] - m['base'])} = {(m['final'] - m['base']) / m['weights']:.2f}x the weights")


def main():
    p = ArgumentParser(description="Speed and memory of tinytis, side by side with transformers where installed.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="prefill and decode tokens/s, tinytis vs transformers on the same random weights")
    add_shape_flags(s, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768, vocab_size=32768)
    s.add_argument("--prompt-len", type=int, default=256)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--threads", type=int, default=torch.get_num_threads())
    s.set_defaults(run=speed)
    s = sub.add_parser("load", help="peak RSS while loading a random-weight checkpoint vs the weights' size")
    add_shape_flags(s, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, head_dim=64, hidden_dim=2048, vocab_size=32768)
    s.add_argument("--file-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the checkpoint on disk")
    s.set_defaults(run=load)
    a = p.parse_args()
    a.run(a)


if __name__ == "__main__":
    run_cli(main)
