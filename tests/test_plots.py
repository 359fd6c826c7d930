"""NIAH heatmaps: a grid of panels, budgets down and at most 6 policies across, at a size that can be read."""
import matplotlib.image

from tinytis.results import Row
from tinytis.plots import layout, plot

POLICIES = ["full", "dms", "h2o", "knorm", "oracle", "random", "snapkv", "streaming", "tis", "tova", "trimkv"]
BUDGETS = [0.05, 0.1, 0.25, 0.5, 0.75]


def runs():
    return {(p, 1.0) for p in ("full", "dms")} | {(p, b) for p in POLICIES[2:] for b in BUDGETS}


def test_layout_puts_budgets_down_and_at_most_six_policies_across():
    panels = layout(runs())
    assert max(col for _, col in panels) == 5  # 6 columns
    assert max(row for row, _ in panels) == 2 * len(BUDGETS) - 1  # 11 policies: two blocks of 5 budget rows
    assert set(panels.values()) == runs()
    for (row, col), (policy, budget) in panels.items():
        block, j = divmod(row, len(BUDGETS))
        assert POLICIES.index(policy) == 6 * block + col
        assert budget == (1.0 if policy in ("full", "dms") else BUDGETS[j])
    assert [panels[j, 0] for j in range(len(BUDGETS))] == [("full", 1.0)] * len(BUDGETS)  # in every budget's row


def test_heatmaps_are_a_readable_grid_for_each_family(tmp_path):
    rows = [Row("niah", "passkey", family, p, b, "agnostic", L, d, "em", 4, 0.5, 1, 2, 0, "x")
            for family in ("id", "ood") for p, b in runs() for L in (512, 1024, 2048) for d in (0.0, 0.5, 1.0)]
    plot(rows, tmp_path)
    for family in ("id", "ood"):
        height, width, _ = matplotlib.image.imread(tmp_path / f"niah_passkey_agnostic_{family}.png").shape
        assert 800 <= width <= 1600 and 800 <= height <= 2000, (width, height)  # not a 6,000 x 300 strip
    assert (tmp_path / "budget_niah_passkey_em.png").exists()
