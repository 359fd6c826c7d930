"""bench.py: the load-time memory bound of the lazy loader, and the speed comparison end to end."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import measure_load  # noqa: E402
from tinytis.config import ModelArgs  # noqa: E402
from tinytis.policies import POLICIES  # noqa: E402

# 58M parameters: 230 MB in fp32, embeddings a quarter of it each, as in a small real model
ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536, vocab_size=32768)


@pytest.mark.parametrize("dtype, file_dtype", [("float32", torch.float32), ("bfloat16", torch.float32)])
def test_peak_rss_while_loading_is_about_one_copy_of_the_weights(dtype, file_dtype):
    m = measure_load(ARGS, dtype, file_dtype)
    assert m["weights"] == 57_680_384 * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    assert m["final"] - m["base"] >= 0.95 * m["weights"]  # the weights are really resident...
    assert (m["peak"] - m["base"]) / m["weights"] < 1.3  # ...and loading them never held much more


def test_speed_runs_the_paged_path_against_transformers():
    """A tiny subset of bench.py speed: the full cache and h2o at two budgets against transformers, one table."""
    pytest.importorskip("transformers")
    flags = ("--models random --dim 64 --n-layers 2 --n-heads 4 --n-kv-heads 2 --head-dim 16 --hidden-dim 128 "
             "--vocab-size 512 --contexts 48 --new-tokens 6 --threads 1 --dtypes float32 --policies full,h2o "
             "--budgets 1.0,0.5 --reps 1")
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "speed", *flags.split()], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr
    diff = float(re.search(r"same weights: max \|logit diff\| after the prompt (\S+)", r.stdout).group(1))
    assert diff < 1e-4  # both engines ran the same weights
    for engine in ("transformers", "tinytis full 1", "tinytis h2o 1", "tinytis h2o 0.5"):
        row = re.search(rf"^random\s+float32\s+1\s+48 {re.escape(engine)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)x$",
                        r.stdout, re.M)
        assert row, r.stdout
        assert min(map(float, row.groups())) > 0
        if engine == "transformers":
            assert row.group(3) == row.group(4) == "1.00"


def test_speed_flags_are_checked():
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "speed", "--policies", "full,nope"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown policy 'nope'; choose from " + ", ".join(POLICIES)


def test_peers_without_kvpress_is_one_line_and_exit_2(tmp_path):
    """Whatever is installed here: a kvpress that cannot be imported (shadowed) gives the one-line hint, no traceback."""
    (tmp_path / "kvpress").mkdir()
    (tmp_path / "kvpress" / "__init__.py").write_text("raise ImportError('no kvpress in this environment')\n")
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "peers", "--n-samples", "1"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=600)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bench.py peers needs kvpress" in lines[0] and ".venv-kvpress" in lines[0], r.stderr
    assert r.stdout == ""
