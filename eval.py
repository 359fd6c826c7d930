"""Evaluate eviction policies on held-out synthetic tasks: task x policy x budget x setting grids.

    python eval.py niah                      # every policy, budgets 0.05/0.1/0.25/0.5/0.75/1.0, query-agnostic
    python eval.py multiq                    # four questions after one context; the budget is held while decoding
    python eval.py niah --family prose       # only the real-prose family (default: all three, side by side)
    python eval.py longbench --data my.jsonl --setting both   # your own data in LongBench's JSONL schema
    python eval.py all --n-samples 100 --setting both --output docs/results.csv --plot docs/plots
    torchrun --nproc_per_node 2 eval.py niah   # the grid sharded over 2 processes, one CSV from rank 0

Writes a CSV (one row per cell and metric), a timing sidecar (tokens/s, peak KV bytes), prints a
summary table, and with --plot draws NIAH heatmaps and budget curves.
"""
from pathlib import Path

import torch

from tinytis import shard
from tinytis.device import add_device_flag, resolve_device
from tinytis.errors import ArgumentParser, UserError, comma_list, run_cli
from tinytis.evaluate import Evaluator
from tinytis.grid import FAMILIES, TASKS, CellKey
from tinytis.manager import check_budget
from tinytis.model import Transformer
from tinytis.plots import plot
from tinytis.policies import POLICIES
from tinytis.results import format_summary, read_csv, write_csv, write_timing
from tinytis.tasks import longbench
from tinytis.tokenizer import Tokenizer
from tinytis.weights import resolve_model_dir

DEFAULT_MODEL = "models/tiny"
DEFAULT_DMS_MODEL = "models/tiny-dms"


def budget_value(text: str):
    """'0.5' -> 0.5 (a fraction), '256' -> 256 (tokens); anything else is a UserError."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"budget {text!r} is not a number; give fractions in (0, 1] or token counts > 1")
    budget = int(value) if value > 1 and value.is_integer() else value
    check_budget(budget)
    return budget


def main():
    parser = ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    parser.add_argument("task", nargs="?", choices=TASKS + ("all", "longbench"), help="task to evaluate (or --benchmark)")
    parser.add_argument("--report", nargs="+", metavar="CSV",
                        help="print the summary tables of earlier results (and --plot them) instead of evaluating")
    parser.add_argument("--benchmark", dest="benchmark", choices=TASKS + ("all",), help=argparse_alias("task"))
    parser.add_argument("--policies", "--baseline", default=None,
                        help="comma-separated policies (default: every available policy); tis=FILE: tis with the "
                             "components in FILE")
    parser.add_argument("--budgets", "--cache_budgets", default="0.05,0.1,0.25,0.5,0.75,1.0",
                        help="comma-separated budgets: fractions in (0, 1] or token counts > 1")
    parser.add_argument("--lengths", default="512,1024,2048", help="context lengths in tokens")
    parser.add_argument("--depths", default="0,0.5,1", help="needle depths (litm: gold position) in [0, 1]")
    parser.add_argument("--litm-docs", default="10,20,30", help="documents per litm sample")
    parser.add_argument("--n-samples", "--n_samples", type=int, default=4, help="samples per cell")
    parser.add_argument("--setting", choices=("agnostic", "aware", "both"), default="agnostic",
                        help="compress the context before the question (agnostic) or with it (aware)")
    parser.add_argument("--family", choices=FAMILIES + ("all",), default="all",
                        help="prompts of the training distribution (id), the held-out prompt family (ood), real prose "
                             "(prose), or all three side by side")
    parser.add_argument("--data", type=Path, help="longbench: a JSONL file of records with context, input, answers")
    parser.add_argument("--max-len", type=int, help="longbench: contexts longer than this many tokens are truncated "
                                                     "from the middle (default: the model's context less 64 tokens)")
    parser.add_argument("--output", default="results.csv", help="CSV to write (timings go beside it)")
    parser.add_argument("--plot", default=None, help="directory for heatmaps and budget curves (PNG)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory or cached hub id")
    parser.add_argument("--dms-model", default=DEFAULT_DMS_MODEL,
                        help="the DMS-retrofitted model policy dms runs on (`python train.py dms` writes it); "
                             "its fidelity is measured against --model's full cache")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    add_device_flag(parser)
    args = parser.parse_args()

    if args.report:
        missing = [p for p in args.report if not Path(p).is_file()]
        if missing:
            raise UserError(f"--report: no results file {missing[0]}; run eval.py with --output first")
        rows = [row for p in args.report for row in read_csv(Path(p))]
        print(format_summary(rows))
        if args.plot:
            plot(rows, Path(args.plot))
        return
    task = args.task or args.benchmark
    if task is None:
        raise UserError(f"name a task: {', '.join(TASKS)} or all")
    policies = args.policies.split(",") if args.policies else list(POLICIES)
    unknown = [p for p in policies if p.partition("=")[0] not in POLICIES]
    if unknown:
        raise UserError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    budgets = [budget_value(b) for b in args.budgets.split(",") if b.strip()]
    lengths, depths = comma_list(int)(args.lengths), comma_list(float)(args.depths)
    litm_docs = comma_list(int)(args.litm_docs)
    if args.n_samples <= 0 or args.batch_size <= 0:
        raise UserError("--n-samples and --batch-size must be positive")
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"depths must lie in [0, 1], got {args.depths}")
    if any(k < 2 for k in litm_docs):
        raise UserError("--litm-docs needs at least 2 documents per sample")
    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.model)
    if args.model == DEFAULT_MODEL and not (model_dir / "config.json").exists():
        raise UserError(f"the embedded model is missing from {DEFAULT_MODEL}; train it with `python train.py base`")
    model = Transformer.from_pretrained(model_dir, device=device)
    tok = Tokenizer.from_dir(model_dir)
    data = {}
    if task == "longbench":
        if args.data is None:
            raise UserError("longbench evaluates your own data: give --data FILE.jsonl (LongBench's schema)")
        max_len = args.max_len or model.args.max_seq_len - 64
        data = {CellKey("longbench", args.data.stem, "id", max_len, -1.0): longbench.read(args.data, tok, max_len)}
        lengths = []
    too_long = [L for L in lengths if L + 64 > model.args.max_seq_len]
    if too_long:
        raise UserError(f"length {too_long[0]} is beyond what the model handles ({model.args.max_seq_len} tokens "
                        "with question and answer); choose shorter --lengths")
    torch.set_num_threads(args.threads)

    policy_models = {}
    if "dms" in policies:
        policy_models["dms"] = Path(args.dms_model)
        if not (policy_models["dms"] / "config.json").is_file():
            raise UserError(f"--dms-model {args.dms_model} is not a model directory; retrofit one with "
                            f"`python train.py dms --out {args.dms_model}` or leave dms out of --policies")

    tasks = [t for t in TASKS if task in (t, "all")] or [task]
    settings = ["agnostic", "aware"] if args.setting == "both" else [args.setting]
    evaluator = Evaluator(model, tok, model_dir, args.batch_size, args.seed, policy_models, data)
    rank, world = shard.init()
    families = FAMILIES if args.family == "all" else (args.family,)
    rows = evaluator.run(tasks, policies, budgets, settings, lengths, depths, litm_docs, args.n_samples, rank, world,
                         families)
    shard.close(world)
    if rank != 0:
        return
    output = Path(args.output)
    write_csv(rows, output)
    write_timing(evaluator.timing, output.with_name(output.stem + ".timing.csv"))
    print(format_summary(rows))
    print(f"wrote {output}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plots in {args.plot}")


def argparse_alias(name: str) -> str:
    return f"same as the positional {name} (the seed cards' flag)"


if __name__ == "__main__":
    run_cli(main)
