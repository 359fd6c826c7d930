"""Plots of evaluation rows (tinytis.results.Row): NIAH heatmap grids and score-vs-KV-bytes curves.

    niah_{variant}_{setting}_{family}.png    a panel per (budget, policy): exact match by depth x length, each cell
                                             written out; budgets down, policies across, at most 6 panels a row
    budget_{task}_{variant}_{metric}.png     score against the KV bytes held, one panel per prompt family
"""
import math
from pathlib import Path

from tinytis.grid import FAMILIES
from tinytis.results import Row, kv_kept, summarize

MAX_COLUMNS = 6
FAMILY_NAMES = {"id": "in-distribution prompts", "ood": "held-out prompt family"}


def plot(rows: list[Row], out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    niah_heatmaps([r for r in rows if r.task == "niah"], out_dir)
    budget_curves(rows, out_dir)


def niah_heatmaps(rows: list[Row], out_dir: Path):
    """One figure per (variant, setting, family). A policy run only at budget 1 (the full cache, dms) is repeated
    in every budget's row, so each row reads against it."""
    import matplotlib.pyplot as plt

    for variant, setting, family in sorted({(r.variant, r.setting, r.family) for r in rows}):
        vr = [r for r in rows if (r.variant, r.setting, r.family) == (variant, setting, family)]
        runs = {(r.policy, r.budget) for r in vr}
        lengths, depths = sorted({r.length for r in vr}), sorted({r.depth for r in vr})
        panels = layout(runs)
        n_rows, n_cols = (max(at[i] for at in panels) + 1 for i in (0, 1))
        fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                                 figsize=(1.1 + (0.45 * len(lengths) + 0.9) * n_cols, 0.8 + (0.3 * len(depths) + 0.8) * n_rows))
        for ax in axes.flat:
            ax.set_visible(False)
        for (row, col), (policy, budget) in panels.items():
            grid = [[math.nan] * len(lengths) for _ in depths]
            for r in vr:
                if (r.policy, r.budget) == (policy, budget):
                    grid[depths.index(r.depth)][lengths.index(r.length)] = r.score
            heatmap(axes[row][col], grid, lengths, depths, f"{policy} @ {budget:g}")
            if col == 0:
                axes[row][col].set_ylabel("depth", fontsize=8)
        fig.suptitle(f"NIAH {variant}, query-{setting}, {FAMILY_NAMES[family]}: exact match by depth (rows) x "
                     "context length (columns)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(out_dir / f"niah_{variant}_{setting}_{family}.png", dpi=100)
        plt.close(fig)


def layout(runs: set[tuple[str, float]]) -> dict[tuple[int, int], tuple[str, float]]:
    """(row, column) of each heatmap panel -> the (policy, budget) it shows. Budgets go down, policies across (the
    full cache first), at most MAX_COLUMNS a row: further policies wrap onto another block of budget rows. A policy
    run only at budget 1 (the full cache, dms) is shown in every budget's row, so each row reads against it."""
    policies = sorted({p for p, _ in runs}, key=lambda p: (p != "full", p))
    only_full = {p for p in policies if {b for q, b in runs if q == p} == {1.0}}
    budgets = sorted({b for p, b in runs if p not in only_full}) or [1.0]
    panels = {}
    for i, policy in enumerate(policies):
        block, col = divmod(i, MAX_COLUMNS)
        for j, budget in enumerate(budgets):
            if policy in only_full or (policy, budget) in runs:
                panels[block * len(budgets) + j, col] = (policy, 1.0 if policy in only_full else budget)
    return panels


def heatmap(ax, grid, lengths, depths, title: str):
    ax.set_visible(True)
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if not math.isnan(v):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.2 or v > 0.8 else "black")  # readable on the dark ends of the scale
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)


def budget_curves(rows: list[Row], out_dir: Path):
    """Score against the KV bytes actually held (so policies that set their own budget, dms, line up), a panel per
    prompt family side by side; tis in red and bold, query-aware dashed."""
    import matplotlib.pyplot as plt

    summary, kept = summarize(rows), kv_kept(rows)
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 3] + list(plt.get_cmap("Dark2").colors)
    for task, variant, metric in sorted({k[:3] for k in summary}):
        series = {k[3:]: v[0] for k, v in summary.items() if k[:3] == (task, variant, metric)}  # (p, b, s, f) -> score
        families = [f for f in FAMILIES if any(k[3] == f for k in series)]
        others = sorted({p for p, *_ in series if p not in ("full", "tis")})
        colors = {"tis": "tab:red", **{p: palette[i % len(palette)] for i, p in enumerate(others)}}
        fig, axes = plt.subplots(1, len(families), figsize=(4.6 * len(families) + 1.6, 3.4), squeeze=False, sharey=True)
        for ax, family in zip(axes[0], families):
            full = [v for (p, _, _, f), v in series.items() if p == "full" and f == family]
            for policy, setting in sorted({(p, s) for p, _, s, f in series if p != "full" and f == family}):
                pts = sorted((kept[(task, variant, s, p, b, f)], v) for (p, b, s, f), v in series.items()
                             if (p, s, f) == (policy, setting, family))
                pts += [(1.0, full[0])] * bool(full)
                ax.plot(*zip(*pts), marker="o", markersize=3, label=f"{policy} ({setting})", color=colors[policy],
                        linewidth=2.2 if policy == "tis" else 1, linestyle="-" if setting == "agnostic" else "--")
            if full:
                ax.axhline(full[0], color="black", linewidth=0.8, label="full cache")
            ax.set_xlabel("KV bytes held / full cache")
            ax.set_title(FAMILY_NAMES[family], fontsize=9)
        axes[0][0].set_ylabel(metric)
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes
        fig.suptitle(f"{task} {variant}: {metric} vs KV bytes held", fontsize=10)
        fig.savefig(out_dir / f"budget_{task}_{variant}_{metric}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
