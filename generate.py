"""Generate text with a Mistral-architecture model: stream the answer, then print cache statistics.

    python generate.py --prompt-file examples/hello.txt
    python generate.py --model mistralai/Mistral-7B-v0.3 --dtype bfloat16 --prompt "The capital of France is"
    python generate.py --prompt-file doc.txt --budget 0.25 --question "Who wrote it?" --question "When?"
    python generate.py --prompt-file doc.txt --policy trimkv --budget 128 --decode-budget 128 --decode-buffer 32

The prompt is prefilled into a paged KV cache and evicted to --budget by --policy; each --question is then
answered from that same compressed cache (query-agnostic: the questions are not seen before eviction).
"""
import argparse
from pathlib import Path

from tinytis.device import add_device_flag
from tinytis.errors import ArgumentParser, UserError, run_cli

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "tiny"


def budget(text: str) -> float | int:
    """--budget: a fraction of the prompt in (0, 1] or an absolute token count (integer > 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if 0 < value <= 1:
        return value
    if value > 1 and value.is_integer() and "." not in text:
        return int(value)
    raise argparse.ArgumentTypeError(f"budget {text!r} is neither a fraction in (0, 1] nor an integer token count > 1")


def parse_args(argv=None):
    p = ArgumentParser(description="Generate text with a Mistral-architecture model.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    source.add_argument("--prompt", help="the prompt text itself")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory or Hugging Face hub id (default: models/tiny)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quant", choices=["nf4"], help="quantize the Linear layers of the blocks on load (bitsandbytes NF4)")
    add_device_flag(p)
    p.add_argument("--budget", type=budget, default=1.0,
                   help="KV budget per (layer, KV head): fraction of the prompt or token count (default 1.0: keep all)")
    p.add_argument("--policy", help="eviction policy (default: dms for a DMS model, tis when the model directory has "
                                     "trained TIS components, as the embedded model does, else snapkv)")
    p.add_argument("--prefill-chunk", type=int, help="prefill this many tokens at a time, evicting after each chunk")
    p.add_argument("--decode-budget", type=budget, help="also evict while decoding, back to this budget")
    p.add_argument("--decode-buffer", type=int, default=16,
                   help="with --decode-budget: evict once a head holds this many tokens more (TRIM-KV: memory_size "
                        "= --decode-budget, buffer_size = this)")
    p.add_argument("--question", action="append", help="a question answered from the compressed prompt (repeatable)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"argument --max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"argument --temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"argument --top-p: must be in (0, 1], got {args.top_p}")
    if args.decode_buffer < 0:
        p.error(f"argument --decode-buffer: must be >= 0, got {args.decode_buffer}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error(f"argument --prefill-chunk: must be at least 1 token, got {args.prefill_chunk}")
    if any(not q.strip() for q in args.question or []):
        p.error("argument --question: the question is empty")
    return args


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"prompt file {args.prompt_file} does not exist; check --prompt-file")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file}: {e}")
    else:
        text = args.prompt
    if not text.strip():
        raise UserError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


def check_default_model(model: str):
    if model == str(DEFAULT_MODEL) and not (DEFAULT_MODEL / "config.json").exists():
        raise UserError(f"the default model {DEFAULT_MODEL} is not there yet (it is being trained); pass --model DIR or a hub id")


def stats_line(gen, policy: str, budget) -> str:
    new = gen.new_tokens
    prefill = gen.prompt_tokens / gen.prefill_s if gen.prefill_s > 0 else float("inf")
    decode = gen.decode_tok_s
    s = gen.stats  # the cache right after eviction
    per_head = sum(map(sum, s["tokens_held"])) / sum(map(len, s["tokens_held"]))
    return (
        f"[tinytis] prompt tokens {gen.prompt_tokens} | new tokens {new} | prefill {prefill:.1f} tok/s | "
        f"decode {decode:.1f} tok/s (after the first step) | KV held {gen.kv_bytes / 2**20:.2f} MiB ({gen.kv_bytes} bytes) | "
        f"after eviction ({policy}, budget {budget}): {per_head:g} of {s['tokens_full']} tokens per head, "
        f"{s['kv_bytes_held'] / 2**20:.2f} of {s['kv_bytes_full'] / 2**20:.2f} MiB"
    )


def main():
    args = parse_args()
    prompt = read_prompt(args)
    check_default_model(args.model)
    run(args, prompt)


def run(args, prompt: str):
    # torch and the engine are imported once the cheap checks have passed, so a typo fails at once
    import torch

    from tinytis.device import resolve_device
    from tinytis.engine import SamplingParams, decode, prefill
    from tinytis.manager import CacheManager, ManagerConfig
    from tinytis.model import Transformer
    from tinytis.importance import COMPONENTS_FILE
    from tinytis.policies import make_policy
    from tinytis.tokenizer import StreamDecoder, Tokenizer
    from tinytis.weights import resolve_model_dir

    config = ManagerConfig(args.budget, prefill_chunk=args.prefill_chunk, decode_budget=args.decode_budget,
                           decode_buffer=args.decode_buffer)
    device = resolve_device(args.device)
    path = resolve_model_dir(args.model)
    model = Transformer.from_pretrained(path, getattr(torch, args.dtype), quant=args.quant, device=device)
    if args.policy is None:
        args.policy = "dms" if model.dms else "tis" if (path / COMPONENTS_FILE).exists() else "snapkv"
    policy = make_policy(args.policy, path, model.args, device)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    ids = tokenizer.encode(prompt)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    state = prefill(model, [ids], CacheManager(model.args, policy, config))
    for question in args.question or [None]:
        q = None if question is None else tokenizer.encode(question, bos=False)
        if question is not None:
            print(f"Q: {question}")
        stream = StreamDecoder(tokenizer, ids + (q or []))
        answering = state.fork() if args.question else state
        gen = decode(model, answering, q and [q], params, tokenizer.eos_id,
                     on_token=lambda b, t: print(stream.push(t), end="", flush=True))
        answering.free()
        print(stream.flush())
        print(stats_line(gen, args.policy, args.budget))


if __name__ == "__main__":
    run_cli(main)
