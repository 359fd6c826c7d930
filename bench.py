"""Speed and memory of tinytis, side by side with transformers where it is installed.

    python bench.py speed    prefill and decode tokens/s of tinytis and transformers on the same random weights
    python bench.py load     a random bf16 checkpoint (--shape mistral-7b-v0.3: 7B, written once to a cache directory)
                             loaded in NF4, 128-token prefill, 8 decoded; peak RSS, beside transformers + bitsandbytes
    python bench.py kernels  NF4 gemv at the Mistral-7B shapes (vs bitsandbytes and dequantize + matmul) and paged
                             decode attention at 4k/16k/32k context: GB/s and fraction of peak bandwidth
    python bench.py overhead what eviction adds to a 4k-token prefill, per policy: recording the attention statistics
                             the policy needs, and scoring + compaction, as fractions of the full-cache prefill time
    python bench.py gpu      the GPU path in one table, written to docs/benchmarks.md: NF4 matmul at the Mistral-7B
                             shapes vs bitsandbytes and bf16, decode tokens/s of a Mistral-7B-shaped model (bf16, NF4) at
                             1k/8k/32k context and budgets 1/0.25/0.1, and transformers' decode (tinytis/bench/gpu.py)
    python bench.py peers    kvpress's presses through transformers against tinytis's policies on the embedded model:
                             same held-out prompts, budgets and query-agnostic setting, one table, a CSV, a plot
                             (run it in the kvpress environment: see the README; tinytis/bench/peers.py)

Every subcommand but peers builds its model from the shape flags (random weights, HF layout in a temporary directory).
"""
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tinytis.bench import gpu, load, peers
from tinytis.config import ModelArgs
from tinytis.device import add_device_flag, resolve_device
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
        logits, cache = out.logits[:, -1].float(), out.cache
        prefill_s = time.perf_counter() - t0
        first = logits[0]
        t0 = time.perf_counter()
        for step in range(n):
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            if step == n - 1:
                break
            out = model(nxt, cache=cache, use_cache=True)
            logits, cache = out.logits[:, -1].float(), out.cache
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


# -- kernels ---------------------------------------------------------------------------------------------------------

NOMINAL_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56, "L40S": 0.86,
                "L4": 0.3, "RTX 4090": 1.01}  # HBM/GDDR bandwidth by device name, TB/s
GEMV_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (in, out) of wq/wo, wk/wv, w1/w3, w2


def _time_s(fn, cuda: bool, reps: int) -> float:
    """Median seconds per call: triton's do_bench on CUDA (L2 flushed between calls), wall clock on CPU."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, rep=reps, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _copy_tbps(device, cuda: bool, reps: int) -> float:
    """Achieved bandwidth of a device-to-device copy (read + write), TB/s: the practical peak."""
    n = 2**28 if cuda else 2**24  # bytes
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / _time_s(lambda: dst.copy_(src), cuda, reps) / 1e12


def _fmt(seconds: float, nbytes: int, peak_tbps: float | None, copy_tbps: float) -> str:
    gbps = nbytes / seconds / 1e9
    frac = f"{gbps / 1e3 / peak_tbps:6.1%}" if peak_tbps else "     -"
    return f"{seconds * 1e6:9.1f} {gbps:8.1f} {frac} {gbps / 1e3 / copy_tbps:6.1%}"


def bench_kernels(args):
    """NF4 gemv at the Mistral-7B shapes against bitsandbytes and dequantize + matmul, and paged decode
    attention at 4k/16k/32k context. On CPU the torch reference path runs, at fewer reps."""
    import kernels
    from kernels.nf4_matmul import nf4_matmul_ref, nf4_matmul_triton
    from kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
    from tinytis import nf4

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    reps = args.reps or (200 if cuda else 1)  # CUDA: milliseconds of do_bench; CPU: calls
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in NOMINAL_TBPS.items() if k in name), None) if cuda else None
    copy = _copy_tbps(device, cuda, reps)
    path = "Triton kernels" if cuda else "torch reference path (no GPU: these are not kernel figures)"
    print(f"device {name}: {path}; kernels backend {kernels.BACKEND}; activations {str(dtype).removeprefix('torch.')}")
    print(f"peak bandwidth: nominal {f'{peak:.2f} TB/s' if peak else 'unknown'}, measured copy {copy:.3f} TB/s")
    print("columns per method: us per call, GB/s, % of nominal peak, % of measured copy bandwidth")

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    ours = ("tinytis triton", lambda x, w: nf4_matmul_triton(x, w)) if cuda else ("tinytis reference", nf4_matmul_ref)
    print("\nNF4 gemv, batch 1, double-quantized absmax; bytes = codes + absmax + x + y")
    print(f"{'in x out':>13} {'MB':>6} | {ours[0]:^32} | {'bitsandbytes matmul_4bit':^32} | {'dequantize + torch.matmul':^32}")
    for k, n in GEMV_SHAPES:
        w_dense = torch.randn(n, k, device=device, dtype=dtype)
        w = nf4.quantize(w_dense)
        x = torch.randn(1, k, device=device, dtype=dtype)
        nbytes = w.nbytes() + (k + n) * x.element_size()
        cells = [_fmt(_time_s(lambda: ours[1](x, w), cuda, reps), nbytes, peak, copy)]
        if bnb is not None:
            packed, state = bnb.functional.quantize_4bit(w_dense, quant_type="nf4", compress_statistics=True)
            cells.append(_fmt(_time_s(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), cuda, reps), nbytes, peak, copy))
        else:
            cells.append(f"{'bitsandbytes not installed':^32}")
        cells.append(_fmt(_time_s(lambda: torch.matmul(x, nf4.dequantize(w, dtype).T), cuda, reps), nbytes, peak, copy))
        if cuda:  # the figures are only worth something if the kernel is right
            err = (nf4_matmul_triton(x, w).float() - nf4_matmul_ref(x, w).float()).abs().max().item()
            cells[0] += f" (max diff vs reference {err:.2e})"
        print(f"{f'{k} x {n}':>13} {nbytes / 1e6:6.1f} | " + " | ".join(cells))
        del w_dense, w

    attn = ("tinytis triton", paged_decode_attention_triton) if cuda else ("tinytis reference", paged_decode_attention_ref)
    B, KV, G, D, page = 1, 8, 4, 128, 16
    contexts = [4096, 16384, 32768] if cuda or args.full else [1024, 4096]
    print(f"\npaged decode attention, one layer: batch {B}, {KV} KV heads x {G} query heads, head_dim {D}, pages of {page}; "
          f"bytes = K + V held")
    print(f"{'context':>8} {'MB':>6} | {attn[0] + ' with mass':^32} | {attn[0] + ' no mass':^32} | {'SDPA, contiguous K/V':^32}")
    for ctx in contexts:
        n_pages = B * KV * ctx // page
        k_pool = torch.randn(n_pages, page, D, device=device, dtype=dtype)
        v_pool = torch.randn_like(k_pool)
        table = torch.randperm(n_pages, device=device).view(B, KV, ctx // page).int()
        lengths = torch.full((B, KV), ctx, device=device, dtype=torch.int32)
        q = torch.randn(B, KV * G, D, device=device, dtype=dtype)
        nbytes = 2 * k_pool.numel() * k_pool.element_size()
        cells = [_fmt(_time_s(lambda: attn[1](q, k_pool, v_pool, table, lengths, D**-0.5, m), cuda, reps), nbytes, peak, copy)
                 for m in (True, False)]
        k = k_pool.view(B, KV, ctx, D)  # contiguous per head: the dense peer
        v = v_pool.view(B, KV, ctx, D)
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
        cells.append(_fmt(_time_s(sdpa, cuda, reps), nbytes, peak, copy))
        if cuda:
            got = paged_decode_attention_triton(q, k_pool, v_pool, table, lengths, D**-0.5)
            ref = paged_decode_attention_ref(q, k_pool, v_pool, table, lengths, D**-0.5)
            cells[0] += f" (max diff out {(got[0].float() - ref[0].float()).abs().max().item():.2e}," \
                        f" mass {(got[1] - ref[1]).abs().max().item():.2e})"
        print(f"{ctx:>8} {nbytes / 1e6:6.1f} | " + " | ".join(cells))


# -- overhead -------------------------------------------------------------------------------------------------------


def overhead(a):
    """Prefill one random prompt with each policy at the budget; the cheapest of --reps runs of each, interleaved.
    Times are CPU seconds of this process, so other load on the machine does not count."""
    from tinytis.engine import prefill
    from tinytis.importance import TIS
    from tinytis.manager import CacheManager, ManagerConfig
    from tinytis.policies import TISPolicy, make_policy

    class TimedManager(CacheManager):
        evict_cpu = 0.0

        def evict(self, cache, budget):
            t0 = time.process_time()
            super().evict(cache, budget)
            self.evict_cpu += time.process_time() - t0

    torch.set_num_threads(a.threads)
    args = model_args(a)
    model = Transformer(args)
    model.init_weights(0)
    model = model.to(getattr(torch, a.dtype)).eval()
    prompt = torch.randint(0, args.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    policies = ["full", *a.policies]
    best = {}  # policy -> (prefill CPU s without eviction, eviction CPU s) of its cheapest run
    for _ in range(a.reps):
        for name in policies:
            policy = TISPolicy(TIS(args)) if name == "tis" else make_policy(name)  # an untrained head costs the same
            manager = TimedManager(args, policy, ManagerConfig(a.budget))
            t0 = time.process_time()
            prefill(model, [prompt], manager)
            run = (time.process_time() - t0 - manager.evict_cpu, manager.evict_cpu)
            if name not in best or sum(run) < sum(best[name]):
                best[name] = run
    base = best["full"][0]
    print(describe(args, a.dtype) + f"; prompt {a.prompt_len} tokens, budget {a.budget}, {a.threads} threads, best of {a.reps}")
    print(f"full-cache prefill {base:.3f} CPU s")
    print(f"{'policy':>10} | {'prefill s':>9} | {'recording':>9} | {'score+compact':>13} | {'of prefill':>10} | total")
    for name in a.policies:
        forward, evict = best[name]
        print(f"{name:>10} | {forward:9.3f} | {(forward - base) / base:+9.1%} | {evict * 1e3:10.1f} ms | {evict / base:10.2%} | "
              f"{(forward + evict - base) / base:+.1%}")


def main():
    p = ArgumentParser(description="Speed and memory of tinytis, side by side with transformers where installed.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="prefill and decode tokens/s, tinytis vs transformers on the same random weights")
    add_shape_flags(s, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768, vocab_size=32768)
    s.add_argument("--prompt-len", type=int, default=256)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--threads", type=int, default=torch.get_num_threads())
    s.set_defaults(run=speed)
    s = sub.add_parser("load", help="a random bf16 checkpoint in the hub's sharded layout, loaded in NF4, prefill + decode; "
                                    "peak RSS against the NF4 bytes held, beside transformers + bitsandbytes")
    load.add_flags(s)
    s.set_defaults(run=load.load)
    s = sub.add_parser("kernels", help="NF4 gemv and paged decode attention: GB/s and fraction of peak (reference path on CPU)")
    s.add_argument("--reps", type=int, help="CUDA: milliseconds of timing per case (default 200); CPU: calls after one warm-up (default 1)")
    s.add_argument("--full", action="store_true", help="on CPU too, the 4k/16k/32k contexts (default there: 1k, 4k)")
    s.set_defaults(run=bench_kernels)
    s = sub.add_parser("overhead", help="what eviction adds to the prefill of a long prompt, per policy")
    add_shape_flags(s, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768, vocab_size=32768)
    s.add_argument("--prompt-len", type=int, default=4096)
    s.add_argument("--budget", type=float, default=0.5)
    s.add_argument("--policies", nargs="+", default=["snapkv", "streaming", "random", "knorm", "tova", "h2o", "tis"])
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--threads", type=int, default=torch.get_num_threads())
    s.set_defaults(run=overhead)
    s = sub.add_parser("gpu", help="NF4 matmul, decode tokens/s at 7B shape and transformers' decode: one table")
    s.add_argument("--shape", choices=["7b", "tiny"], default="7b", help="7b: Mistral-7B-v0.3's shapes; tiny: the same on small ones")
    s.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    add_device_flag(s)
    s.set_defaults(run=lambda a: gpu.run(a.shape, resolve_device(a.device), a.output))
    peers.add_parser(sub)
    a = p.parse_args()
    a.run(a)


if __name__ == "__main__":
    run_cli(main)
