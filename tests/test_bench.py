"""bench.py: the load-time memory bounds of the streaming loader (dense, and `bench.py load` in NF4), and the speed
comparison end to end."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tinytis.bench.load import measure_dense_load  # noqa: E402
from tinytis.config import ModelArgs  # noqa: E402
from tinytis.policies import POLICIES  # noqa: E402

# 58M parameters: 230 MB in fp32, embeddings a quarter of it each, as in a small real model
ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536, vocab_size=32768)


@pytest.mark.parametrize("dtype, file_dtype", [("float32", torch.float32), ("bfloat16", torch.float32)])
def test_peak_rss_while_loading_is_about_one_copy_of_the_weights(dtype, file_dtype):
    m = measure_dense_load(ARGS, dtype, file_dtype)
    assert m["weights"] == 57_680_384 * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    assert m["final"] - m["base"] >= 0.95 * m["weights"]  # the weights are really resident...
    assert (m["peak"] - m["base"]) / m["weights"] < 1.3  # ...and loading them never held much more


# two layers and a large vocabulary: the bf16 embedding and lm_head (64 MiB each) are the largest tensors, as in 7B
LOAD_FLAGS = "--dim 1024 --n-layers 2 --n-heads 16 --n-kv-heads 4 --head-dim 64 --hidden-dim 2048 --vocab-size 32768"


def test_load_writes_the_hub_layout_once_and_holds_the_rss_bound(tmp_path):
    """`bench.py load` at a small shape: the sharded checkpoint (with a tokenizer.json transformers reads), the NF4
    load's peak RSS growth within 1.15 x the NF4 bytes held + the largest bf16 tensor, and a second run reuses it."""
    cmd = [sys.executable, str(ROOT / "bench.py"), "load", *LOAD_FLAGS.split(), "--cache-dir", str(tmp_path),
           "--threads", "1", "--no-peers"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    (path,) = tmp_path.iterdir()
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer.json"} <= {f.name for f in path.iterdir()}
    result = json.loads(r.stdout.split("json: ", 1)[1])
    ours = result["tinytis"]
    assert ours["bytes_held"] == 143_423_800  # 2 x 64 MiB bf16 embeddings + 17.8M weights in NF4 + norms
    assert ours["load_peak_rss"] - ours["base_rss"] <= 1.15 * ours["bytes_held"] + result["largest_tensor"]
    assert ours["decode_tok_s"] > 0 and "its growth over the RSS before loading" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert "(cached)" in r.stdout


def test_ert_step_runs_at_a_tiny_shape():
    """`bench.py ert-step` (issue 25's ERT step, which the lead runs at --shape mistral-7b-v0.3): random NF4 base,
    steps timed, peak RSS reported."""
    cmd = [sys.executable, str(ROOT / "bench.py"), "ert-step", "--dim", "128", "--n-layers", "2", "--n-heads", "4",
           "--n-kv-heads", "2", "--head-dim", "32", "--hidden-dim", "384", "--vocab-size", "512", "--context", "64",
           "--continuation", "8", "--steps", "2", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.split("json: ", 1)[1])
    assert len(result["seconds_per_step"]) == 2 and all(s > 0 for s in result["seconds_per_step"])
    assert result["tis_params"] == (128 * 128 + 128) + (128 * 4 + 4) + 128 + 512 * 4  # fc1, fc2, norm, embedding
    assert result["peak_rss_steps"] >= result["rss_built"] > 0


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


def test_gpu_bench_tiny_prints_and_writes_one_table(tmp_path):
    """bench.py gpu --shape tiny: the GPU benchmark's code on small shapes (on CPU here, the torch path): one table
    with every part's rows, the same text printed and written."""
    out = tmp_path / "benchmarks.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "gpu", "--shape", "tiny", "--output", str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text in r.stdout
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["part", "case", "engine", "dtype", "batch", "budget", "us/call", "GB/s", "% HBM", "tokens/s",
                      "KV MiB", "vs peer"]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    engines = {"tinytis (torch)" if "TINYTIS_KERNELS" not in os.environ else "tinytis (triton)", "torch matmul"}
    try:
        import bitsandbytes  # noqa: F401

        engines.add("bitsandbytes")
    except ImportError:
        pass
    matmul = [r for r in rows if r["part"] == "nf4 matmul"]
    assert {(r["case"], r["batch"], r["engine"]) for r in matmul} == {
        (case, b, e) for case in ("128x128", "64x128", "256x128", "128x256") for b in ("1", "4", "16") for e in engines}
    assert all(float(r["us/call"]) > 0 and float(r["GB/s"]) > 0 for r in matmul)
    ours = [r for r in rows if r["part"] == "decode" and r["engine"].startswith("tinytis")]
    assert {(r["case"], r["dtype"], r["budget"]) for r in ours} == {
        (f"ctx {c}", d, b) for c in (64, 128, 256) for d in ("float32", "nf4") for b in ("1", "0.25", "0.1")}
    assert all(float(r["tokens/s"]) > 0 and float(r["KV MiB"]) > 0 for r in ours)
    for r in ours:  # eviction holds fewer KV bytes than the full cache of the same context
        full = next(f for f in ours if (f["case"], f["dtype"], f["budget"]) == (r["case"], r["dtype"], "1"))
        assert r["budget"] == "1" or float(r["KV MiB"]) < float(full["KV MiB"])
    if importlib.util.find_spec("transformers"):
        peers = [r for r in rows if r["engine"].startswith("transformers")]
        assert len(peers) == 6 and all(float(r["tokens/s"]) > 0 for r in peers)
        assert all(r["vs peer"].endswith("x") for r in ours if r["budget"] == "1")
