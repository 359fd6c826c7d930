"""The rows of an evaluation grid: one per cell, (policy, budget, setting) and metric; CSV I/O and summary tables.

tinytis.evaluate writes them, eval.py --report and tinytis.plots read them. Timing (tokens/s, peak KV bytes) depends
on the machine, so it goes to a sidecar CSV, not into the rows.
"""
import csv
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from tinytis.errors import UserError
from tinytis.grid import FAMILIES


@dataclass
class Row:
    task: str
    variant: str
    family: str
    policy: str
    budget: float  # a fraction; token-count budgets are written as floats too
    setting: str
    length: int
    depth: float
    metric: str
    n: int
    score: float
    kv_bytes_held: int
    kv_bytes_full: int
    seed: int
    commit: str


def git_commit() -> str:
    """The checkout's short commit, which stamps every row ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_csv(rows: list[Row], path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Row.__dataclass_fields__))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    tmp.replace(path)


def write_timing(timing, path: Path):
    """Tokens/s and peak KV bytes per (policy, budget, setting, task): machine-dependent, so kept out of the CSV."""
    agg = {}
    for task, policy, budget, setting, tokens, prefill_s, total_s, peak in timing:
        a = agg.setdefault((task, policy, budget, setting), [0, 0.0, 0.0, 0])
        a[0], a[1], a[2], a[3] = a[0] + tokens, a[1] + prefill_s, a[2] + total_s, max(a[3], peak)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "policy", "budget", "setting", "prefill_tokens_per_s", "seconds", "peak_kv_bytes"])
        for (task, policy, budget, setting), (tokens, prefill_s, total_s, peak) in agg.items():
            w.writerow([task, policy, budget, setting, round(tokens / max(prefill_s, 1e-9)), round(total_s, 2), peak])
    tmp.replace(path)


def summarize(rows: list[Row]) -> dict:
    """Mean score per (task, variant, metric, policy, budget, setting, family) over lengths and depths, weighted by n."""
    acc = {}
    for r in rows:
        a = acc.setdefault((r.task, r.variant, r.metric, r.policy, r.budget, r.setting, r.family), [0.0, 0])
        a[0], a[1] = a[0] + r.score * r.n, a[1] + r.n
    return {k: (s / n, n) for k, (s, n) in acc.items()}


def read_csv(path: Path) -> list[Row]:
    """Rows of a results CSV; one written before the prompt families (no family column) holds "id" rows."""
    types = {name: f.type for name, f in Row.__dataclass_fields__.items()}  # str, int or float
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (list(types), [k for k in types if k != "family"]):
            raise UserError(f"{path} is not a results CSV written by eval.py (its columns differ)")
        return [Row(**{k: types[k](v) for k, v in {"family": "id", **r}.items()}) for r in reader]


def kv_kept(rows: list[Row]) -> dict:
    """KV bytes held after compression / the full cache's, per (task, variant, setting, policy, budget, family): a
    policy that sets its own budget (dms) is compared with the others at this fraction."""
    first, acc = {}, {}
    for r in rows:
        if r.metric == first.setdefault((r.task, r.variant), r.metric):  # every metric of a cell holds the same bytes
            a = acc.setdefault((r.task, r.variant, r.setting, r.policy, r.budget, r.family), [0, 0])
            a[0], a[1] = a[0] + r.kv_bytes_held, a[1] + r.kv_bytes_full
    return {k: held / full for k, (held, full) in acc.items()}


def format_summary(rows: list[Row]) -> str:
    """Markdown tables, one per (task, variant, metric, setting): a row per policy, a column per budget and prompt
    family (in-distribution and held-out side by side), n per cell; then one of the KV bytes held per (task,
    variant, setting)."""
    tables = {}
    for (task, variant, metric, policy, budget, setting, family), value in summarize(rows).items():
        tables.setdefault((task, variant, metric, setting), {})[(policy, budget, family)] = value
    for (task, variant, setting, policy, budget, family), fraction in kv_kept(rows).items():
        tables.setdefault((task, variant, "KV bytes held / full cache", setting), {})[(policy, budget, family)] = (fraction, 0)
    out = []
    for (task, variant, metric, setting), cells in sorted(tables.items()):
        families = [f for f in FAMILIES if any(f == c[2] for c in cells)]
        columns = [(b, f) for b in sorted({c[1] for c in cells}) for f in families]
        n = max(v[1] for v in cells.values())
        out.append(f"\n**{task} {variant}, {metric}, query-{setting}**" + (f" (n = {n} per cell)\n" if n else "\n"))
        tagged = families != ["id"]  # name the family in each column unless every prompt is in-distribution
        out.append("| policy | " + " | ".join(f"{b:g}" + (f" {f}" if tagged else "") for b, f in columns) + " |")
        out.append("|---|" + "---:|" * len(columns))
        for policy in sorted({c[0] for c in cells}, key=lambda p: (p != "full", p)):
            row = [f"{cells[(policy, b, f)][0]:.3f}" if (policy, b, f) in cells else "" for b, f in columns]
            out.append(f"| {policy} | " + " | ".join(row) + " |")
    return "\n".join(out)
