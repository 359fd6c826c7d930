"""Every evaluation sample is generated from an evaluation seed, never a training one: the grids of eval.py and the
held-out evaluations inside training (the base stages' family accuracy, the eviction stages' evaluate_eviction).
The generators are wrapped to record the seed each sample is made from."""
from pathlib import Path

import pytest
import torch

from tinytis import grid
from tinytis.anchors import Anchors
from tinytis.model import Transformer
from tinytis.tasks import litm, narrative, niah
from tinytis.tasks.seeds import EVAL_SEEDS, TRAIN_SEEDS
from tinytis.tokenizer import Tokenizer
from tinytis.train.base import family_accuracy
from tinytis.train.tis import evaluate_eviction

TINY = Path(__file__).parents[1] / "models" / "tiny"
COUNT = lambda s: len(s.split())  # noqa: E731  a stand-in tokenizer for the grid's samples


def recording(make, seeds: list, seed_at: int):
    """make, which also appends the seed it is called with (its seed_at-th argument) to seeds."""
    def wrapped(*args):
        seeds.append(args[seed_at])
        return make(*args)
    return wrapped


def assert_evaluation_seeds(seeds: list):
    assert seeds, "no sample was generated from a seed"
    assert not [s for s in seeds if s in TRAIN_SEEDS], "an evaluation sample was made from a training seed"
    assert all(s in EVAL_SEEDS for s in seeds)


def test_grid_samples_come_from_evaluation_seeds(monkeypatch):
    seeds = []
    for family, makers in grid.GENERATORS.items():
        for task, make in makers.items():
            monkeypatch.setitem(makers, task, recording(make, seeds, 1 if task == "niah" else 0))
    for task in grid.TASKS:
        for cell in grid.cells(task, [96], [0.5], [3], grid.FAMILIES):
            assert len(grid.make_samples(cell, 3, 0, COUNT)) == 3
    assert len(seeds) == 3 * sum(len(grid.cells(t, [96], [0.5], [3], grid.FAMILIES)) for t in grid.TASKS)
    assert_evaluation_seeds(seeds)


@pytest.fixture
def training_seeds_recorded(monkeypatch):
    """The seeds training.sample hands to the task generators while the fixture is active."""
    seeds = []
    monkeypatch.setattr(niah, "make", recording(niah.make, seeds, 1))
    monkeypatch.setattr(narrative, "make", recording(narrative.make, seeds, 0))
    monkeypatch.setattr(litm, "make", recording(litm.make, seeds, 0))
    return seeds


@pytest.fixture(scope="module")
def tiny():
    return Transformer.from_pretrained(TINY), Tokenizer.from_dir(TINY)


def test_base_stage_family_accuracy_uses_evaluation_seeds(tiny, training_seeds_recorded):
    model, tok = tiny
    for family in ("passkey", "multikey", "narrative", "litm"):
        family_accuracy(model, tok, family, 96, n=4)
    assert len(training_seeds_recorded) == 16
    assert_evaluation_seeds(training_seeds_recorded)


def test_evaluate_eviction_uses_evaluation_seeds(tiny, training_seeds_recorded):
    model, tok = tiny
    a = model.args
    no_preference = lambda cache, hidden, ids, pos: torch.zeros(ids.shape[0], a.n_layers, a.n_kv_heads, ids.shape[1])  # noqa: E731
    evaluate_eviction(model, tok, 0.5, Anchors(), no_preference, n=8, length=96)
    assert_evaluation_seeds(training_seeds_recorded)
