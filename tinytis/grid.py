"""The evaluation grid: tasks, prompt families, the cells of a grid, their held-out samples, the (policy, budget) runs.

A cell is one (task variant, prompt family, length, depth) of held-out samples. Family "id": the prompts of the
training distribution (tinytis.tasks generators, on evaluation seeds); "ood": the held-out prompt family
(tinytis.tasks.heldout), text no training stage draws; "prose": the facts in real English prose from the standard
library's evaluation split (tinytis.tasks.prose_family), which no training stage reads. tinytis.evaluate runs a grid; tinytis.results holds its rows.
"""
import random
from dataclasses import dataclass

from tinytis.tasks import Sample, fidelity, heldout, litm, multiq, narrative, niah, prose_family
from tinytis.tasks.seeds import EVAL_SEEDS

TASKS = ("niah", "litm", "narrative", "fidelity", "multiq")
FAMILIES = ("id", "ood", "prose")  # in-distribution prompts, the held-out prompt family, real prose
GENERATORS = {  # family -> task -> sample generator
    "id": {"niah": niah.make, "litm": litm.make, "narrative": narrative.make, "multiq": multiq.make, "fidelity": fidelity.make},
    **{name: {task: getattr(family, task) for task in TASKS} for name, family in
       (("ood", heldout.FAMILY), ("prose", prose_family.FAMILY))},
}


@dataclass(frozen=True)
class CellKey:
    task: str
    variant: str
    family: str  # "id", "ood" or "prose" (FAMILIES)
    length: int  # context tokens requested (litm: number of documents)
    depth: float  # where the asked fact sits, 0..1 (litm: gold document / (docs - 1))


def cells(task: str, lengths, depths, litm_docs, families=("id",)) -> list[CellKey]:
    if task == "niah":
        return [CellKey(task, v, f, L, d) for v in niah.VARIANTS for f in families for L in lengths for d in depths]
    if task == "litm":
        return [CellKey(task, f"{k}docs", f, k, d) for f in families for k in litm_docs for d in depths]
    if task == "narrative":
        return [CellKey(task, "story", f, L, d) for f in families for L in lengths for d in depths]
    if task == "multiq":
        return [CellKey(task, f"{multiq.N_QUESTIONS}q", f, L, -1.0) for f in families for L in lengths]
    return [CellKey(task, "mix", f, L, -1.0) for f in families for L in lengths]


def make_samples(cell: CellKey, n: int, seed: int, count) -> list[Sample]:
    """n held-out samples of a cell, each generated from a seed in EVAL_SEEDS (never a training seed); the same
    (cell, n, seed) always gives the same samples (an "ood" cell: the held-out family's prompts on the seeds of its
    "id" twin)."""
    rng = random.Random(f"{cell.task}/{cell.variant}/{cell.length}/{cell.depth}/{seed}")
    seeds = [rng.randrange(EVAL_SEEDS.start, EVAL_SEEDS.stop) for _ in range(n)]
    make = GENERATORS[cell.family][cell.task]
    if cell.task == "niah":
        return [make(cell.variant, s, cell.length, cell.depth, count) for s in seeds]
    if cell.task == "litm":
        return [make(s, cell.length, round(cell.depth * (cell.length - 1))) for s in seeds]
    if cell.task == "narrative":
        return [make(s, cell.length, cell.depth, count) for s in seeds]
    return [make(s, cell.length, count) for s in seeds]


def runs(policies, budgets, unbudgeted=()):
    """(policy, budget) pairs: the full cache and the policies that set their own budget (dms) once at 1.0; every
    other policy at each budget below 1."""
    once = [p for p in policies if p == "full" or p in unbudgeted]
    return [(p, 1.0) for p in once] + [(p, b) for p in policies if p not in once for b in budgets if b != 1.0]
