"""Speed and memory of tinytis, side by side with transformers where it is installed.

    python bench.py speed    prefill and decode tokens/s of tinytis (paged cache, cache manager, a policy at a budget)
                             against transformers on the same weights: the embedded model and a random one
    python bench.py load     peak RSS while loading a random-weight checkpoint, against the loaded weights' size
    python bench.py kernels  NF4 gemv at the Mistral-7B shapes (vs bitsandbytes and dequantize + matmul) and paged
                             decode attention at 4k/16k/32k context: GB/s and fraction of peak bandwidth
    python bench.py overhead what eviction adds to a 4k-token prefill, per policy: recording the attention statistics
                             the policy needs, and scoring + compaction, as fractions of the full-cache prefill time
    python bench.py peers    kvpress's presses through transformers against tinytis's policies on the embedded model:
                             same held-out prompts, budgets and query-agnostic setting, one table, a CSV, a plot
                             (run it in the kvpress environment: see the README)

Every subcommand but peers builds its model from the shape flags (random weights, HF layout in a temporary directory);
speed also runs the embedded model. The benchmarks live in tinytis/bench/, one module each.
"""
import contextlib
import multiprocessing
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from tinytis.bench.common import add_shape_flags, describe, model_args, random_checkpoint
from tinytis.bench.kernels import bench_kernels
from tinytis.bench.overhead import overhead
from tinytis.bench.speed import MODELS, speed
from tinytis.config import ModelArgs
from tinytis.errors import ArgumentParser, UserError, comma_list, run_cli
from tinytis.model import Transformer


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
    s = sub.add_parser("speed", help="prefill and decode tok/s through the paged cache and a policy vs transformers")
    add_shape_flags(s, dtype_flag=False, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768,
                    vocab_size=32768)  # the random model: 19.8M parameters
    s.add_argument("--models", type=comma_list(str), default=list(MODELS), help="embedded (models/tiny) and/or random")
    s.add_argument("--contexts", type=comma_list(int), default=[1024, 2048, 4096], help="prompt tokens")
    s.add_argument("--threads", type=comma_list(int), default=[1, 2])
    s.add_argument("--dtypes", type=comma_list(str), default=["float32", "bfloat16"])
    s.add_argument("--policies", type=comma_list(str), default=["full", "tis", "h2o"])
    s.add_argument("--budgets", type=comma_list(float), default=[1.0, 0.5, 0.25], help="of every policy but full")
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--reps", type=int, default=5, help="timed runs of each engine after the warm-up; the median is shown")
    s.set_defaults(run=speed)
    s = sub.add_parser("load", help="peak RSS while loading a random-weight checkpoint vs the weights' size")
    add_shape_flags(s, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, head_dim=64, hidden_dim=2048, vocab_size=32768)
    s.add_argument("--file-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the checkpoint on disk")
    s.set_defaults(run=load)
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
