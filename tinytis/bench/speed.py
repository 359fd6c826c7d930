"""bench.py speed: prefill and decode through the path users run, against transformers on the same weights.

tinytis runs engine.prefill + engine.decode: a PagedKVCache, the CacheManager and a policy at a budget (what
generate.py and eval.py run). transformers runs its own model with a DynamicCache and SDPA attention. Both decode
greedily for --new-tokens tokens, never stopping early. In each (model, dtype, threads, context) cell, every engine
runs once as a warm-up and then --reps times, the engines interleaved, so load on the machine falls on all of them
alike; a figure is the median of its runs. Decode tok/s is the steady rate, without the first decode step (which
pays the warm-up), on both sides; prefill tok/s is prompt tokens over the seconds to the first logits. Ops per step:
the torch ops a decode step dispatches (counted below the Python API, in a run of its own), a measure of the step's
overhead that does not depend on the load on the machine.
"""
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinytis.bench.common import describe, model_args, random_checkpoint
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, decode, prefill
from tinytis.errors import UserError
from tinytis.importance import COMPONENTS_FILE, TIS
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import POLICIES, TISPolicy, make_policy

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "tiny"
MODELS = ("embedded", "random")
TRANSFORMERS = ("transformers", 1.0)  # the peer's row: its full cache


def engines(policies: list[str], budgets: list[float]) -> list[tuple[str, float]]:
    """(policy, budget) of every tinytis row: the full cache once, each other policy at each budget."""
    return [("full", 1.0)] * ("full" in policies) + [(p, b) for p in policies if p != "full" for b in budgets]


def make_bench_policy(name: str, model_dir: Path, args: ModelArgs):
    """The policy by name; tis without trained components (a random model) gets an untrained head: same cost."""
    if name == "tis" and not (model_dir / COMPONENTS_FILE).exists():
        return TISPolicy(TIS(args))
    return make_policy(name, model_dir, args)


def tinytis_run(model, model_dir: Path, prompt: list[int], policy: str, budget: float, new_tokens: int):
    """(prefill tok/s, decode tok/s, logits after the prompt) of one run through the paged cache."""
    manager = CacheManager(model.args, make_bench_policy(policy, model_dir, model.args), ManagerConfig(budget))
    state = prefill(model, [prompt], manager)
    logits = state.logits[0]
    gen = decode(model, state, None, SamplingParams(max_new_tokens=new_tokens))
    return len(prompt) / state.prefill_s, gen.decode_tok_s, logits


@torch.inference_mode()
def transformers_run(model, prompt: list[int], new_tokens: int):
    """The same run with transformers' own cache, timed as tinytis.engine times prefill and decode."""
    t0 = time.perf_counter()
    out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    logits, cache = out.logits[:, -1].float(), out.cache
    prefill_s = time.perf_counter() - t0
    first = logits[0]
    t0 = time.perf_counter()
    for step in range(new_tokens - 1):  # as engine.decode_loop: the last token is sampled, not fed
        nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
        out = model(nxt, cache=cache, use_cache=True)
        logits, cache = out.logits[:, -1].float(), out.cache
        if step == 0:
            t1 = time.perf_counter()
    logits.argmax(-1)
    return len(prompt) / prefill_s, (new_tokens - 1) / (time.perf_counter() - t1), first


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(run: Callable[[int], object], steps: int = 10) -> float:
    """Torch ops per decode step of run(new_tokens): the ops of a run `steps` tokens longer, over those steps."""
    counts = []
    for new_tokens in (3, 3 + steps):
        with OpCounter() as counter:
            run(new_tokens)
        counts.append(counter.n)
    return (counts[1] - counts[0]) / steps


def measure_cell(model_dir: Path, dtype: torch.dtype, context: int, rows: list, a) -> dict:
    """Medians of prefill and decode tok/s for every row (policy, budget) of one cell, the torch ops of a decode step
    of each, and the largest logit difference between tinytis and transformers after the prompt (both load the same
    weights)."""
    from transformers import AutoModelForCausalLM

    ours = Transformer.from_pretrained(model_dir, dtype)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    prompt = torch.randint(3, ours.args.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {row: [] for row in rows}
    logits = {}
    for rep in range(a.reps + 1):  # the first is the warm-up
        for row in rows:
            if row == TRANSFORMERS:
                *speeds, logits[row] = transformers_run(theirs, prompt, a.new_tokens)
            else:
                *speeds, logits[row] = tinytis_run(ours, model_dir, prompt, *row, a.new_tokens)
            if rep:
                runs[row].append(speeds)
    medians = {row: tuple(statistics.median(r[i] for r in runs[row]) for i in (0, 1)) for row in rows}
    ops = {row: ops_per_step(lambda n: transformers_run(theirs, prompt, n)) if row == TRANSFORMERS
           else ops_per_step(lambda n: tinytis_run(ours, model_dir, prompt, *row, n)) for row in rows}
    diff = max((logits[row] - logits[TRANSFORMERS]).abs().max().item() for row in rows)
    return medians, ops, diff


def speed(a):
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("bench.py speed compares against transformers, which is not installed: pip install -e '.[test]'")
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if any(d not in ("float32", "bfloat16") for d in a.dtypes):
        raise UserError(f"--dtypes are float32 and/or bfloat16, got {','.join(a.dtypes)}")
    if a.reps < 1 or a.new_tokens < 3:
        raise UserError("--reps must be >= 1 and --new-tokens >= 3 (the first decode step is not counted)")
    unknown = [p for p in a.policies if p not in POLICIES]
    if unknown:
        raise UserError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    rows = [TRANSFORMERS] + engines(a.policies, a.budgets)
    table, notes = [], []
    with tempfile.TemporaryDirectory() as d:
        dirs = {"embedded": EMBEDDED, "random": Path(d)}
        if "random" in a.models:
            random_checkpoint(model_args(a), Path(d))
        for name in a.models:
            args = ModelArgs.from_dir(dirs[name])
            fits = [c for c in a.contexts if c + a.new_tokens <= args.max_seq_len]
            if len(fits) < len(a.contexts):
                notes.append(f"{name}: max_seq_len {args.max_seq_len}, so contexts above {args.max_seq_len - a.new_tokens}"
                             f" were not run ({', '.join(str(c) for c in a.contexts if c not in fits)})")
            notes.append(f"{name}: {describe(args, '/'.join(a.dtypes))}")
            for dtype in a.dtypes:
                for threads in a.threads:
                    torch.set_num_threads(threads)
                    for context in fits:
                        table.append(((name, dtype, threads, context), *measure_cell(dirs[name], getattr(torch, dtype),
                                                                                      context, rows, a)))
    print_table(table, notes, a)


def print_table(table, notes, a):
    print(f"{a.new_tokens} new tokens (greedy), median of {a.reps} runs after a warm-up, engines interleaved; "
          "decode tok/s without the first step; x: tinytis / transformers (its full cache) in the same cell")
    for note in notes:
        print(note)
    print(f"{'model':<9} {'dtype':<9} {'thr':>3} {'context':>7} {'engine':<18} {'prefill tok/s':>13} {'decode tok/s':>12}"
          f" {'prefill x':>9} {'decode x':>8}")
    for (name, dtype, threads, context), medians, _, diff in table:
        base = medians[TRANSFORMERS]
        for row, (pf, dec) in medians.items():
            print(f"{name:<9} {dtype:<9} {threads:>3} {context:>7} {engine_name(row):<18} {pf:>13.1f} {dec:>12.1f}"
                  f" {pf / base[0]:>8.2f}x {dec / base[1]:>7.2f}x")
        print(f"{'':<31}same weights: max |logit diff| after the prompt {diff:.2e}")
    print_side_by_side(table)


def engine_name(row) -> str:
    return "transformers" if row == TRANSFORMERS else f"tinytis {row[0]} {row[1]:g}"


def print_side_by_side(table):
    """Every tinytis row's decode x (prefill x) against transformers, a column each, and the torch ops per decode
    step of every engine."""
    rows = list(table[0][1]) if table else []
    names = [engine_name(row).removeprefix("tinytis ") for row in rows[1:]]
    print("\nside by side: decode x (prefill x) against transformers; torch ops per decode step, transformers first")
    print(f"{'model':<9} {'dtype':<9} {'thr':>3} {'context':>7} " + " ".join(f"{n:>15}" for n in names) + "  ops/step")
    for (name, dtype, threads, context), medians, ops, _ in table:
        base = medians[TRANSFORMERS]
        ratios = [f"{dec / base[1]:.2f}x ({pf / base[0]:.2f}x)" for pf, dec in list(medians.values())[1:]]
        print(f"{name:<9} {dtype:<9} {threads:>3} {context:>7} " + " ".join(f"{r:>15}" for r in ratios)
              + "  " + " / ".join(f"{ops[row]:.0f}" for row in rows))
