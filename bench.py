"""Speed and memory of tinytis, side by side with transformers where it is installed.

    python bench.py speed    prefill and decode tokens/s of tinytis and transformers on the same random weights
    python bench.py load     a random bf16 checkpoint (--shape mistral-7b-v0.3: 7B, written once to a cache directory)
                             loaded in NF4, 128-token prefill, 8 decoded; peak RSS, beside transformers + bitsandbytes
    python bench.py kernels  NF4 gemv at the Mistral-7B shapes (vs bitsandbytes and dequantize + matmul) and paged
                             decode attention at 4k/16k/32k context: GB/s and fraction of peak bandwidth
    python bench.py overhead what eviction adds to a 4k-token prefill, per policy: recording the attention statistics
                             the policy needs, and scoring + compaction, as fractions of the full-cache prefill time
    python bench.py peers    kvpress's presses through transformers against tinytis's policies on the embedded model:
                             same held-out prompts, budgets and query-agnostic setting, one table, a CSV, a plot
                             (run it in the kvpress environment: see the README)

Every subcommand but peers builds its model from the shape flags (random weights, HF layout in a temporary directory).
"""
import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinytis.bench import load
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, generate
from tinytis.errors import ArgumentParser, UserError, comma_list, run_cli
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


# -- peers ----------------------------------------------------------------------------------------------------------

PRESSES = ("snapkv", "streaming", "observed_attention", "tova", "knorm", "expected_attention", "adakv", "pyramidkv",
           "random")
PEER_TASKS = ("niah", "narrative", "fidelity")  # the single-context tasks with a length (the cells of eval.py)


def make_press(kvpress, name: str, budget: float):
    """kvpress's press `name` at its published defaults, keeping `budget` of the context (compression_ratio = 1 - budget).
    AdaKV reallocates the budget across the heads of a layer by ExpectedAttention's scores (kvpress's own pairing)."""
    ratio = 1 - budget
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    if name == "random":
        return kvpress.RandomPress(compression_ratio=ratio, seed=0)
    cls = {"snapkv": kvpress.SnapKVPress, "streaming": kvpress.StreamingLLMPress,
           "observed_attention": kvpress.ObservedAttentionPress, "tova": kvpress.TOVAPress, "knorm": kvpress.KnormPress,
           "expected_attention": kvpress.ExpectedAttentionPress, "pyramidkv": kvpress.PyramidKVPress}[name]
    return cls(compression_ratio=ratio)


class PressedCache:
    """transformers' cache of a context compressed by a press (None: the full cache), and the tokens that follow it
    fed at their true positions, as kvpress's pipeline does."""

    @torch.inference_mode()
    def __init__(self, model, press, context: list[int]):
        from transformers import DynamicCache

        self.model, self.cache, self.pos = model, DynamicCache(), len(context)
        with press(model) if press is not None else contextlib.nullcontext():
            model.model(input_ids=torch.tensor([context]), past_key_values=self.cache)
        lengths = {layer.keys.shape[-2] for layer in self.cache.layers}
        # per-layer budgets (PyramidKV) leave the layers different lengths, and transformers sizes a multi-token
        # causal mask by the first layer's cache: such a cache takes one token per forward
        self.one_token_per_forward = len(lengths) > 1
        self.bytes_held = sum(layer.keys.numel() + layer.values.numel() for layer in self.cache.layers) * model.dtype.itemsize

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens; returns the logits (len(tokens), V), each for the token after its position."""
        out, step = [], 1 if self.one_token_per_forward else max(1, len(tokens))
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            positions = torch.arange(self.pos, self.pos + len(chunk))[None]
            out.append(self.model(input_ids=torch.tensor([chunk]), past_key_values=self.cache, position_ids=positions).logits[0])
            self.pos += len(chunk)
        return torch.cat(out)


def press_answer(cache: PressedCache, question: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """Greedy answer to the question from a pressed cache: the new tokens, up to and excluding EOS."""
    logits, tokens = cache.feed(question)[-1], []
    while (nxt := int(logits.argmax())) != eos_id and len(tokens) < max_new_tokens:
        tokens.append(nxt)
        logits = cache.feed([nxt])[-1]
    return tokens


def press_continuation_logits(cache: PressedCache, cont: list[int]) -> torch.Tensor:
    """Teacher-forced logits (len(cont) - 1, V) at the positions that predict cont[1:], as Evaluator.continue_logits."""
    return cache.feed(cont[:-1])


def press_rows(kvpress, model_dir: Path, evaluator, cells, samples, presses, budgets) -> list:
    """Score every press at every budget, and transformers' full cache once, on each cell's samples. Fidelity is
    KL(full || pressed) against transformers' own full cache, the reference tinytis's rows use on its side."""
    from transformers import AutoModelForCausalLM

    from tinytis.evaluate import MAX_NEW_TOKENS, Row, fidelity_metrics, score_answer

    # ObservedAttention reads the attention weights (eager attention only); AdaKV masks keys inside SDPA
    models = {impl: AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32).eval()
              for impl in ("eager", "sdpa")}
    config, dtype = models["sdpa"].config, models["sdpa"].dtype
    token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    runs = [("transformers", 1.0)] + [(f"kvpress/{p}", b) for p in presses for b in budgets]
    rows, tok = [], evaluator.tok
    bar = tqdm(total=len(cells) * len(samples[cells[0]]) * len(runs), desc="kvpress", unit="run")
    for cell in cells:
        batch, contexts, questions, conts = evaluator.encode(samples[cell], "agnostic")
        full_logits = []  # fidelity: the transformers run comes first and its logits are the reference
        for name, budget in runs:
            press_name = name.removeprefix("kvpress/")
            press = make_press(kvpress, press_name, budget) if name != "transformers" else None
            model = models["eager" if press_name == "observed_attention" else "sdpa"]
            metrics, held = {}, 0
            for i, (s, context) in enumerate(zip(batch, contexts)):
                cache = PressedCache(model, press, context)
                held += cache.bytes_held
                if cell.task == "fidelity":
                    logits = press_continuation_logits(cache, conts[i])
                    if press is None:
                        full_logits.append(logits)
                    scores = {k: v[0] for k, v in fidelity_metrics([full_logits[i]], [logits], [conts[i]]).items()}
                else:
                    tokens = press_answer(cache, questions[i], tok.eos_id, MAX_NEW_TOKENS)
                    scores = score_answer(cell.task, tok.decode(tokens), s.answer)
                for k, v in scores.items():
                    metrics.setdefault(k, []).append(v)
                bar.update()
            full = sum(len(c) for c in contexts) * token_bytes
            rows += [Row(cell.task, cell.variant, name, budget, "agnostic", cell.length, cell.depth, m, len(v),
                         sum(v) / len(v), held, full, evaluator.seed, evaluator.commit) for m, v in metrics.items()]
    bar.close()
    return rows


def plot_peers(rows, path: Path):
    """Score vs budget, a panel per task variant (exact match; fidelity: KL(full || evicted)): tinytis's policies
    solid, kvpress's presses dashed, the full cache black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinytis.evaluate import summarize

    summary = {k: v[0] for k, v in summarize(rows).items() if k[2] == ("kl" if k[0] == "fidelity" else "em")}
    panels = sorted({k[:3] for k in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    policies = sorted({k[3] for k in summary if k[3] not in ("full", "transformers")})
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(policies)} | {"tis": "crimson"}
    budgets = sorted({k[4] for k in summary if k[3] in policies})  # the full cache is a line, not a point
    for ax, (task, variant, metric) in zip(axes[0], panels):
        series = {k[3:5]: v for k, v in summary.items() if k[:3] == (task, variant, metric)}
        for policy in policies:
            pts = sorted((b, v) for (p, b), v in series.items() if p == policy)
            press = policy.startswith("kvpress/")
            ax.plot(*zip(*pts), marker="x" if press else "o", markersize=3, linestyle="--" if press else "-",
                    linewidth=2.4 if policy == "tis" else 1.2, color=colors[policy], label=policy)
        if ("full", 1.0) in series and metric != "kl":  # the full cache's KL is 0
            ax.axhline(series[("full", 1.0)], color="black", linewidth=0.8, label="full cache")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("budget (fraction of the context kept)")
        if metric == "kl":
            ax.set_yscale("log")
            ax.set_ylabel("KL(full || evicted), nats/token (lower is better)")
        else:
            ax.set_ylabel("exact match")
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task} {variant}", fontsize=9)
    axes[0][-1].legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("tinytis policies (solid) vs kvpress presses (dashed), query-agnostic", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def peers(a):
    try:
        import kvpress
    except ImportError:
        raise UserError("bench.py peers needs kvpress, which is not installed here; create its environment and run it "
                        "there: python -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 -e . kvpress")
    from tinytis.evaluate import Evaluator, cells as task_cells, format_summary, make_samples, write_csv
    from tinytis.policies import POLICIES
    from tinytis.tokenizer import Tokenizer
    from tinytis.weights import resolve_model_dir

    if not a.tasks or any(t not in PEER_TASKS for t in a.tasks):
        raise UserError(f"peer tasks are {', '.join(PEER_TASKS)}, got {','.join(a.tasks)}")
    unknown = [p for p in a.presses if p not in PRESSES] + [p for p in a.policies if p not in POLICIES]
    if unknown:
        raise UserError(f"unknown press or policy {unknown[0]!r}; presses: {', '.join(PRESSES)}; "
                        f"policies: {', '.join(POLICIES)}")
    if not all(0 < b < 1 for b in a.budgets):
        raise UserError(f"peer budgets are fractions of the context in (0, 1), got {a.budgets}")
    if a.n_samples <= 0:
        raise UserError("--n-samples must be positive")
    torch.set_num_threads(a.threads)
    model_dir = resolve_model_dir(a.model)
    model, tok = Transformer.from_pretrained(model_dir), Tokenizer.from_dir(model_dir)
    if any(L + 64 > model.args.max_seq_len for L in a.lengths):
        raise UserError(f"--lengths go up to {model.args.max_seq_len - 64} tokens for this model (question and answer follow)")
    count = lambda s: len(tok.encode(s, bos=False))  # noqa: E731
    cells = [c for t in a.tasks for c in task_cells(t, a.lengths, a.depths, [])]
    samples = {c: make_samples(c, a.n_samples, a.seed, count) for c in cells}
    evaluator = Evaluator(model, tok, model_dir, seed=a.seed)
    rows = evaluator.run(a.tasks, ["full", *a.policies], a.budgets, ["agnostic"], a.lengths, a.depths, [], a.n_samples)
    rows += press_rows(kvpress, model_dir, evaluator, cells, samples, a.presses, a.budgets)
    write_csv(rows, Path(a.output))
    print(format_summary(rows))
    print(f"wrote {a.output}")
    if a.plot:
        plot_peers(rows, Path(a.plot))
        print(f"plot in {a.plot}")


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
    s = sub.add_parser("peers", help="kvpress's presses vs tinytis's policies on the embedded model (kvpress environment)")
    s.add_argument("--tasks", type=comma_list(str), default=list(PEER_TASKS), help="comma-separated: " + ", ".join(PEER_TASKS))
    s.add_argument("--presses", type=comma_list(str), default=list(PRESSES))
    s.add_argument("--policies", type=comma_list(str), default=["tis", "oracle", "h2o", "snapkv", "tova", "streaming", "knorm",
                                                             "random"], help="tinytis policies (the full cache always runs)")
    s.add_argument("--budgets", type=comma_list(float), default=[0.05, 0.1, 0.25, 0.5])
    s.add_argument("--lengths", type=comma_list(int), default=[1024])
    s.add_argument("--depths", type=comma_list(float), default=[0.0, 0.5, 1.0])
    s.add_argument("--n-samples", type=int, default=4, help="held-out samples per (task variant, length, depth)")
    s.add_argument("--model", default="models/tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", default="peers.csv", help="CSV in eval.py's format (eval.py --report reads it)")
    s.add_argument("--plot", default=None, help="PNG of score vs budget, every policy and press")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(run=peers)
    a = p.parse_args()
    a.run(a)


if __name__ == "__main__":
    run_cli(main)
