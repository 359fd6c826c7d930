"""generate.py as a user runs it: the streamed answer and stats line, and one-line errors (exit 2) for bad input."""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tinytis.bench.load import random_sharded_checkpoint
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, generate
from tinytis.model import Transformer
from tinytis.tokenizer import Tokenizer
from tinytis.weights import save_hf

ROOT = Path(__file__).resolve().parent.parent
mistral_common = pytest.importorskip("mistral_common")
V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32768, max_seq_len=512)
PROMPT = "The grass is green. The sky is"
STATS = re.compile(
    r"\[tinytis\] prompt tokens (\d+) \| new tokens (\d+) \| prefill [\d.]+ tok/s \| decode [\d.]+ tok/s \(after the first step\) \| KV held [\d.]+ MiB \((\d+) bytes\)"
    r" \| after eviction \(\w+, budget [\d.]+\): [\d.]+ of \d+ tokens per head, [\d.]+ of [\d.]+ MiB"
)
PAGE = 16


def paged_bytes(tokens, element_size):
    """Bytes of the KV pages (16 tokens each) that hold this many tokens in every layer and KV head."""
    return -(-tokens // PAGE) * PAGE * ARGS.n_layers * ARGS.n_kv_heads * ARGS.head_dim * 2 * element_size


def run(*args, cwd=ROOT, script=ROOT / "generate.py", env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=1200)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model = Transformer(ARGS)
    model.init_weights(seed=0, std=0.3)
    save_hf(model.state_dict(), path, ARGS)
    shutil.copy(V3, path / "tokenizer.model")
    return path


def copy_model(model_dir, dest, without=()):
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns(*without))
    return dest


def expected_answer(model_dir, params):
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(PROMPT)
    gen = generate(Transformer.from_pretrained(model_dir), [ids], params, tok.eos_id)
    answer = gen.tokens[0]
    assert len(answer) == params.max_new_tokens  # no EOS, so the cache holds prompt + answer minus the last token
    return tok.decode(ids + answer)[len(tok.decode(ids)):], len(ids), len(answer)


@pytest.mark.parametrize("flags, params", [
    ((), SamplingParams(max_new_tokens=20)),
    (("--temperature", 0.8, "--top-p", 0.9, "--seed", 3), SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3)),
])
def test_streams_the_answer_then_stats(model_dir, flags, params):
    text, n_prompt, n_new = expected_answer(model_dir, params)
    r = run("--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 20, *flags)
    assert r.returncode == 0, r.stderr
    answer, stats = r.stdout.rsplit("\n", 2)[:2] if r.stdout.endswith("\n") else (None, None)
    assert answer == text
    m = STATS.fullmatch(stats)
    assert m and [int(g) for g in m.groups()] == [n_prompt, n_new, paged_bytes(n_prompt + n_new - 1, 4)], stats


def test_bfloat16_and_prompt_file(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPT)
    r = run("--model", model_dir, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 5, "--dtype", "bfloat16", "--budget", 0.5)
    assert r.returncode == 0, r.stderr
    m = STATS.fullmatch(r.stdout.splitlines()[-1])
    n_prompt, n_new, kv_bytes = (int(g) for g in m.groups())
    assert kv_bytes == paged_bytes(round(0.5 * n_prompt) + n_new - 1, 2)  # half the prompt kept, then the answer


# Mistral-7B-v0.3's layout at 1/16 of its width (GQA 4, hidden 3.5 x dim, head_dim 32): every Linear's K a multiple of
# 64, so the NF4 matmuls run the C kernels where they build
SEVEN_B_FAMILY = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=896, vocab_size=1024,
                           max_seq_len=4096, rope_theta=1e6)


def test_nf4_h2o_on_a_sharded_random_checkpoint(tmp_path):
    """Issue 25's command at a small shape: `generate.py --model <dir> --quant nf4 --budget 0.25 --policy h2o
    --prompt-file ...` on a random checkpoint written as `bench.py load` writes the 7B one (bf16 shards with
    model.safetensors.index.json, config.json, a trained sentencepiece tokenizer): tokens come out, exit 0."""
    path = random_sharded_checkpoint(SEVEN_B_FAMILY, tmp_path / "model", shard_bytes=1 << 20)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    (tmp_path / "p.txt").write_text(" ".join(["alpha beta gamma delta epsilon zeta"] * 40))
    r = run("--model", path, "--quant", "nf4", "--budget", 0.25, "--policy", "h2o", "--prompt-file", tmp_path / "p.txt",
            "--max-new-tokens", 6, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    n_prompt, n_new, _ = (int(g) for g in STATS.fullmatch(r.stdout.splitlines()[-1]).groups())
    assert n_prompt > 100 and n_new >= 1


def corrupt_cases(model_dir, tmp: Path):
    """Each bad input: (generate.py arguments, extra environment, a word the message must contain)."""
    weights = (model_dir / "model.safetensors").read_bytes()
    truncated = copy_model(model_dir, tmp / "truncated")
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    garbage = copy_model(model_dir, tmp / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 8 + weights[8:])
    mismatch = copy_model(model_dir, tmp / "mismatch")
    config = json.loads((model_dir / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    unknown = copy_model(model_dir, tmp / "unknown")
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (tmp / "empty.txt").write_text(" \n\t\n")
    prompt = ("--prompt", PROMPT)
    return {
        "missing prompt file": (("--model", model_dir, "--prompt-file", tmp / "nope.txt"), {}, "nope.txt"),
        "empty prompt": (("--model", model_dir, "--prompt", ""), {}, "empty"),
        "empty prompt file": (("--model", model_dir, "--prompt-file", tmp / "empty.txt"), {}, "empty"),
        "no prompt": (("--model", model_dir), {}, "--prompt"),
        "model dir without config": (("--model", copy_model(model_dir, tmp / "noconfig", ["config.json"]), *prompt), {}, "config.json"),
        "model dir without weights": (("--model", copy_model(model_dir, tmp / "noweights", ["*.safetensors"]), *prompt), {}, "weights"),
        "model dir missing": (("--model", tmp / "does-not-exist", *prompt), {}, "--model"),
        "hub id not cached": (("--model", "nobody/no-such-model", *prompt), {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}, "not in the local Hugging Face cache"),
        "truncated safetensors": (("--model", truncated, *prompt), {}, "truncated or corrupt"),
        "corrupt safetensors": (("--model", garbage, *prompt), {}, "truncated or corrupt"),
        "shape mismatch": (("--model", mismatch, *prompt), {}, "shape"),
        "unknown model_type": (("--model", unknown, *prompt), {}, "model_type 'gpt2'"),
        "budget 0": (("--model", model_dir, *prompt, "--budget", "0"), {}, "budget"),
        "budget 1.5": (("--model", model_dir, *prompt, "--budget", "1.5"), {}, "budget"),
        "budget -3": (("--model", model_dir, *prompt, "--budget=-3"), {}, "budget"),
        "budget text": (("--model", model_dir, *prompt, "--budget", "half"), {}, "budget"),
    }


BAD_INPUTS = [
    "missing prompt file", "empty prompt", "empty prompt file", "no prompt", "model dir without config",
    "model dir without weights", "model dir missing", "hub id not cached", "truncated safetensors", "corrupt safetensors",
    "shape mismatch", "unknown model_type", "budget 0", "budget 1.5", "budget -3", "budget text",
]


@pytest.fixture(scope="module")
def bad_runs(model_dir, tmp_path_factory):
    """All bad-input runs at once: each is a fresh interpreter importing torch, the slow part."""
    cases = corrupt_cases(model_dir, tmp_path_factory.mktemp("bad"))
    assert sorted(cases) == sorted(BAD_INPUTS)
    with ThreadPoolExecutor(4) as pool:
        futures = {name: (pool.submit(run, *args, env=env), word) for name, (args, env, word) in cases.items()}
        return {name: (f.result(), word) for name, (f, word) in futures.items()}


def assert_one_line_error(r, word):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert word in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(bad_runs, case):
    assert_one_line_error(*bad_runs[case])


def test_missing_default_model_names_the_flag(tmp_path):
    """A checkout where models/tiny is not there (yet): generate.py without --model says to pass --model."""
    shutil.copy(ROOT / "generate.py", tmp_path / "generate.py")
    r = run("--prompt", PROMPT, cwd=tmp_path, script=tmp_path / "generate.py")
    assert_one_line_error(r, "--model")
    assert "models/tiny" in r.stderr


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1", 1.0), ("1.0", 1.0), ("1e-3", 0.001), ("2", 2), ("4096", 4096)])
def test_budget_accepts_fractions_and_token_counts(text, value):
    sys.path.insert(0, str(ROOT))
    from generate import budget

    assert budget(text) == value and type(budget(text)) is type(value)
