"""eval.py: the same command gives the same CSV; bad input is one line and exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_eval(*args, launcher=()):
    return subprocess.run([sys.executable, *launcher, "eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=600)


def test_same_command_twice_gives_an_identical_csv(tmp_path):
    args = ["niah", "--policies", "full,tis,h2o,oracle", "--budgets", "0.25,1.0", "--lengths", "256", "--depths", "0.5",
            "--n-samples", "3", "--threads", "1"]
    first = run_eval(*args, "--output", str(tmp_path / "a.csv"))
    second = run_eval(*args, "--output", str(tmp_path / "b.csv"))
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    a, b = (tmp_path / "a.csv").read_text(), (tmp_path / "b.csv").read_text()
    assert a == b
    header, *rows = a.splitlines()
    assert header.split(",")[:10] == ["task", "variant", "family", "policy", "budget", "setting", "length", "depth",
                                      "metric", "n"]
    assert len(rows) == 3 * 3 * 4  # 3 variants x 3 prompt families x (full at 1.0 + tis, h2o, oracle at 0.25)
    assert sorted({row.split(",")[2] for row in rows}) == ["id", "ood", "prose"]
    assert (tmp_path / "a.timing.csv").exists()
    report = run_eval("--report", str(tmp_path / "a.csv"))
    assert report.returncode == 0 and "| tis |" in report.stdout
    assert "| policy | 0.25 id | 0.25 ood | 0.25 prose | 1 id | 1 ood | 1 prose |" in report.stdout  # side by side


def test_one_family_and_a_csv_from_before_the_families(tmp_path):
    """--family ood writes only held-out rows; a CSV without the family column reads as in-distribution rows."""
    r = run_eval("niah", "--policies", "full,snapkv", "--budgets", "0.25", "--lengths", "256", "--depths", "0.5",
                 "--n-samples", "2", "--threads", "1", "--family", "ood", "--output", str(tmp_path / "o.csv"))
    assert r.returncode == 0, r.stderr
    header, *rows = (tmp_path / "o.csv").read_text().splitlines()
    assert {row.split(",")[2] for row in rows} == {"ood"} and "| policy | 0.25 ood | 1 ood |" in r.stdout
    old = [",".join(c for i, c in enumerate(line.split(",")) if i != 2) for line in [header, *rows]]
    (tmp_path / "old.csv").write_text("\n".join(old) + "\n")
    report = run_eval("--report", str(tmp_path / "old.csv"))
    assert report.returncode == 0, report.stderr
    assert "| policy | 0.25 | 1 |" in report.stdout


def test_torchrun_over_two_processes_gives_the_csv_of_one(tmp_path):
    """Each rank runs every other cell; rank 0 merges them into the single-process CSV, byte for byte."""
    args = ["all", "--policies", "full,snapkv", "--budgets", "0.25,1.0", "--lengths", "256", "--depths", "0,1",
            "--litm-docs", "4", "--n-samples", "1", "--threads", "1"]
    one = run_eval(*args, "--output", str(tmp_path / "one.csv"))
    two = run_eval(*args, "--output", str(tmp_path / "two.csv"),
                   launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    timings = [(tmp_path / f).read_text().splitlines() for f in ("one.timing.csv", "two.timing.csv")]
    assert [line.split(",")[:4] for line in timings[0]] == [line.split(",")[:4] for line in timings[1]]


@pytest.mark.parametrize("args,message", [
    (["sudoku"], "invalid choice"),
    (["niah", "--policies", "nope"], "unknown policy"),
    (["niah", "--policies", "tis=missing.pt"], "missing.pt not found"),
    (["niah", "--policies", "snapkv=x.pt"], "only tis takes a components file"),
    (["niah", "--budgets", "0"], "budget 0"),
    (["niah", "--budgets", "1.5"], "budget 1.5"),
    (["niah", "--budgets", "half"], "not a number"),
    (["niah", "--lengths", "100000"], "beyond what the model handles"),
    (["niah", "--n-samples", "0"], "must be positive"),
    (["niah", "--depths", "1.5"], "depths must lie in"),
    (["--report", "missing.csv"], "no results file"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run_eval(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_fidelity_of_the_full_cache_is_exact(tmp_path):
    """The full cache against itself: KL 0, top-1 agreement 1, perplexity unchanged; an evicting policy differs."""
    r = run_eval("fidelity", "--policies", "full,streaming", "--budgets", "0.1,1.0", "--lengths", "256",
                 "--n-samples", "2", "--threads", "1", "--output", str(tmp_path / "f.csv"))
    assert r.returncode == 0, r.stderr
    from tinytis.results import read_csv

    scores = {(row.policy, row.metric): row.score for row in read_csv(tmp_path / "f.csv")}
    assert scores[("full", "kl")] == 0 and scores[("full", "top1")] == 1 and scores[("full", "ppl_delta")] == 0
    assert scores[("streaming", "kl")] > 0
