"""bench.py peers: kvpress's presses through transformers against tinytis's policies on the embedded model, on the
same held-out prompts (both prompt families), budgets and query-agnostic setting: one table, a CSV, a plot.

Run it in the kvpress environment (README): python -m venv .venv-kvpress && .venv-kvpress/bin/pip install
torch==2.13.0 -e . kvpress==0.5.5. transformers and kvpress are imported only here, inside the functions that use them.
"""
import contextlib
from pathlib import Path

import torch
from tqdm import tqdm

from tinytis.errors import UserError, comma_list
from tinytis.model import Transformer

PRESSES = ("snapkv", "streaming", "observed_attention", "tova", "knorm", "expected_attention", "adakv", "pyramidkv",
           "random", "keydiff", "compactor", "kvzip", "cur", "lagkv", "critical_adakv", "adakv_tova")
PEER_TASKS = ("niah", "narrative", "fidelity")  # the single-context tasks with a length (the cells of eval.py)


def make_press(kvpress, name: str, budget: float):
    """kvpress's press `name` at its published defaults, keeping `budget` of the context (compression_ratio = 1 - budget).
    AdaKV reallocates the budget across the heads of a layer by ExpectedAttention's scores (kvpress's own pairing),
    adakv_tova by TOVA's; CriticalAdaKV weighs ExpectedAttention's scores by the output projection (without the value
    norm, as kvpress advises)."""
    ratio = 1 - budget
    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    if name == "adakv_tova":
        return kvpress.AdaKVPress(kvpress.TOVAPress(compression_ratio=ratio))
    if name == "critical_adakv":
        return kvpress.CriticalAdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio, use_vnorm=False))
    if name == "random":
        return kvpress.RandomPress(compression_ratio=ratio, seed=0)
    cls = {"snapkv": kvpress.SnapKVPress, "streaming": kvpress.StreamingLLMPress,
           "observed_attention": kvpress.ObservedAttentionPress, "tova": kvpress.TOVAPress, "knorm": kvpress.KnormPress,
           "expected_attention": kvpress.ExpectedAttentionPress, "pyramidkv": kvpress.PyramidKVPress,
           "keydiff": kvpress.KeyDiffPress, "compactor": kvpress.CompactorPress, "kvzip": kvpress.KVzipPress,
           "cur": kvpress.CURPress, "lagkv": kvpress.LagKVPress}[name]
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

    from tinytis.evaluate import MAX_NEW_TOKENS, fidelity_metrics, score_answer
    from tinytis.results import Row

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
                    scores = score_answer(cell.task, tok.decode(tokens), s)
                for k, v in scores.items():
                    metrics.setdefault(k, []).append(v)
                bar.update()
            full = sum(len(c) for c in contexts) * token_bytes
            rows += [Row(cell.task, cell.variant, cell.family, name, budget, "agnostic", cell.length, cell.depth, m, len(v),
                         sum(v) / len(v), held, full, evaluator.seed, evaluator.commit) for m, v in metrics.items()]
    bar.close()
    return rows


def plot_peers(rows, path: Path):
    """Score vs budget, a panel per task variant (exact match; fidelity: KL(full || evicted)) across and prompt family
    down: tinytis's policies solid, kvpress's presses dashed, the full cache black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinytis.grid import FAMILIES
    from tinytis.results import summarize
    from tinytis.plots import FAMILY_NAMES

    summary = {k: v[0] for k, v in summarize(rows).items() if k[2] == ("kl" if k[0] == "fidelity" else "em")}
    panels = sorted({k[:3] for k in summary})
    families = [f for f in FAMILIES if any(k[6] == f for k in summary)]
    fig, axes = plt.subplots(len(families), len(panels), figsize=(4.2 * len(panels), 3.6 * len(families)), squeeze=False,
                             gridspec_kw={"hspace": 0.3})
    policies = sorted({k[3] for k in summary if k[3] not in ("full", "transformers")})
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(policies)} | {"tis": "crimson"}
    budgets = sorted({k[4] for k in summary if k[3] in policies})  # the full cache is a line, not a point
    for row, family in zip(axes, families):
        for ax, (task, variant, metric) in zip(row, panels):
            series = {k[3:5]: v for k, v in summary.items() if k[:3] == (task, variant, metric) and k[6] == family}
            for policy in policies:
                pts = sorted((b, v) for (p, b), v in series.items() if p == policy)
                press = policy.startswith("kvpress/")
                if pts:
                    ax.plot(*zip(*pts), marker="x" if press else "o", markersize=3, linestyle="--" if press else "-",
                            linewidth=2.4 if policy == "tis" else 1.2, color=colors[policy], label=policy)
            if ("full", 1.0) in series and metric != "kl":  # the full cache's KL is 0
                ax.axhline(series[("full", 1.0)], color="black", linewidth=0.8, label="full cache")
            ax.set_xscale("log")
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.minorticks_off()
            if family == families[-1]:
                ax.set_xlabel("budget (fraction of the context kept)")
            if metric == "kl":
                ax.set_yscale("log")
                ax.set_ylabel("KL(full || evicted), nats/token (lower is better)")
            else:
                ax.set_ylabel("exact match")
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{task} {variant}, {FAMILY_NAMES[family]}", fontsize=9)
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
                        "there: python -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 -e . kvpress==0.5.5")
    from tinytis.evaluate import Evaluator
    from tinytis.grid import FAMILIES, cells as task_cells, make_samples
    from tinytis.results import format_summary, write_csv
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
    families = FAMILIES if a.family == "both" else (a.family,)
    cells = [c for t in a.tasks for c in task_cells(t, a.lengths, a.depths, [], families)]
    samples = {c: make_samples(c, a.n_samples, a.seed, count) for c in cells}
    evaluator = Evaluator(model, tok, model_dir, seed=a.seed)
    rows = evaluator.run(a.tasks, ["full", *a.policies], a.budgets, ["agnostic"], a.lengths, a.depths, [], a.n_samples,
                         families=families)
    rows += press_rows(kvpress, model_dir, evaluator, cells, samples, a.presses, a.budgets)
    write_csv(rows, Path(a.output))
    print(format_summary(rows))
    print(f"wrote {a.output}")
    if a.plot:
        plot_peers(rows, Path(a.plot))
        print(f"plot in {a.plot}")


def add_parser(sub):
    """The peers subcommand of bench.py."""
    s = sub.add_parser("peers", help="kvpress's presses vs tinytis's policies on the embedded model (kvpress environment)")
    s.add_argument("--tasks", type=comma_list(str), default=list(PEER_TASKS), help="comma-separated: " + ", ".join(PEER_TASKS))
    s.add_argument("--presses", type=comma_list(str), default=list(PRESSES))
    s.add_argument("--policies", type=comma_list(str), default=["tis", "oracle", "h2o", "snapkv", "tova", "streaming", "knorm",
                                                             "random"], help="tinytis policies (the full cache always runs)")
    s.add_argument("--budgets", type=comma_list(float), default=[0.05, 0.1, 0.25, 0.5])
    s.add_argument("--lengths", type=comma_list(int), default=[1024])
    s.add_argument("--depths", type=comma_list(float), default=[0.0, 0.5, 1.0])
    s.add_argument("--n-samples", type=int, default=4, help="held-out samples per (task variant, length, depth)")
    s.add_argument("--family", choices=("id", "ood", "both"), default="both",
                   help="prompts of the training distribution (id), the held-out prompt family (ood), or both")
    s.add_argument("--model", default="models/tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", default="peers.csv", help="CSV in eval.py's format (eval.py --report reads it)")
    s.add_argument("--plot", default=None, help="PNG of score vs budget, every policy and press")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(run=peers)
