"""Your own data in LongBench's JSONL schema: eval.py longbench scores it as eval.py scores the same samples generated,
train.py ert --data trains TIS on it for a random-weight Mistral held in NF4, and malformed input is one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytis.bench.load import random_sharded_checkpoint
from tinytis.config import ModelArgs
from tinytis.grid import CellKey, make_samples
from tinytis.results import read_csv
from tinytis.importance import TIS
from tinytis.model import Transformer
from tinytis.tokenizer import Tokenizer

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# a small Mistral with its own 2,048-piece tokenizer (random words), written as the hub's sharded layout
MISTRAL = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=2048,
                    max_seq_len=1024, rope_theta=1e4)


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=900)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def narrative_records(n=20, length=256, depth=0.5):
    """The samples eval.py narrative makes for one cell, as LongBench records."""
    tok = Tokenizer.from_dir(ROOT / "models/tiny")
    samples = make_samples(CellKey("narrative", "story", "id", length, depth), n, 0, lambda s: len(tok.encode(s, bos=False)))
    return [{"context": s.context, "input": s.question, "answers": [s.answer], "length": length, "_id": f"n{i}"}
            for i, s in enumerate(samples)]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return random_sharded_checkpoint(MISTRAL, tmp_path_factory.mktemp("mistral"), shard_bytes=1 << 20)


def test_longbench_scores_equal_narrative_on_the_same_samples(tmp_path):
    data = write_jsonl(tmp_path / "own.jsonl", narrative_records())
    grid = ["--policies", "full,snapkv", "--budgets", "0.25", "--setting", "both", "--batch-size", "10"]
    a = run("eval.py", "narrative", "--lengths", "256", "--depths", "0.5", "--n-samples", "20", "--family", "id", *grid,
            "--output", tmp_path / "narrative.csv")
    b = run("eval.py", "longbench", "--data", data, *grid, "--output", tmp_path / "longbench.csv",
            "--plot", tmp_path / "plots")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    key = lambda r: (r.policy, r.budget, r.setting, r.metric)
    narrative = {key(r): (r.score, r.n, r.kv_bytes_held) for r in read_csv(tmp_path / "narrative.csv")}
    own = {key(r): (r.score, r.n, r.kv_bytes_held) for r in read_csv(tmp_path / "longbench.csv")}
    assert len(own) == 2 * 2 * 2 and own == narrative  # f1 and em, both settings, full and snapkv
    assert {f.name for f in (tmp_path / "plots").iterdir()} >= {"budget_longbench_own_f1.png", "budget_longbench_own_em.png"}


def test_an_answer_scores_its_best_reference(tmp_path):
    from tinytis.evaluate import score_answer
    from tinytis.tasks.longbench import parse

    (record,) = parse(write_jsonl(tmp_path / "a.jsonl", [{"context": "c", "input": "q", "answers": ["the red cup", "a mug"]}]))
    assert score_answer("longbench", "A mug.", record) == {"f1": 1.0, "em": 1.0}
    assert score_answer("longbench", "red cup", record) == {"f1": 1.0, "em": 1.0}
    assert score_answer("longbench", "the blue cup", record)["f1"] == pytest.approx(0.5)


def test_ert_on_own_data_trains_the_head_of_an_nf4_mistral_and_drives_generate(mistral_dir, tmp_path):
    data = write_jsonl(tmp_path / "own.jsonl", narrative_records())
    out = tmp_path / "tis_components.pt"
    r = run("train.py", "ert", "--model", mistral_dir, "--quant", "nf4", "--data", data, "--max-len", 256,
            "--oracle-steps", 2, "--steps", 3, "--eval-every", 100, "--run-dir", tmp_path / "run", "--out", out,
            "--save-every-s", 0, "--threads", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "truncated from the middle" in r.stderr  # narrative contexts of 256 words-ish tokens in a 2,048-piece vocab
    blob = torch.load(out, weights_only=True)
    assert blob["meta"]["base_model"] == str(mistral_dir) and "--quant nf4" in blob["meta"]["command"]
    trained = TIS.load(out, MISTRAL)
    torch.manual_seed(0)  # the initial components: the run's seed 0 draws them first
    fresh = TIS(MISTRAL)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any(k.startswith("importance_head") for k in changed) and any(k.startswith("importance_embedding") for k in changed)

    r = run("generate.py", "--model", mistral_dir, "--quant", "nf4", "--policy", f"tis={out}", "--budget", "0.5",
            "--prompt", "alpha beta gamma delta " * 20, "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr


def test_ert_gradients_reach_only_the_components_of_an_nf4_base(mistral_dir):
    """Five ERT steps (alignment + KL) on the NF4 model: the head moves, no base weight does, not even by a bit."""
    from tinytis.tasks.longbench import Record
    from tinytis.train.common import optimizer_step
    from tinytis.anchors import Anchors
    from tinytis.train.tis import context_batch, tis_losses

    model = Transformer.from_pretrained(mistral_dir, quant="nf4").requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = Tokenizer.from_dir(mistral_dir)
    samples = [Record("longbench", r["context"], r["input"], r["answers"][0], 0, -1.0, answers=tuple(r["answers"]))
               for r in narrative_records(4)]
    torch.manual_seed(0)
    tis = TIS(model.args)
    head = {k: v.clone() for k, v in tis.state_dict().items()}
    opt = torch.optim.AdamW(tis.parameters(), lr=1e-2)
    for _ in range(5):
        align, kl = tis_losses(model, tis, context_batch(tok, samples), 0.25, Anchors(2, 4))
        optimizer_step(opt, kl + 0.1 * align)
    assert all(not torch.equal(v, head[k]) for k, v in tis.state_dict().items() if k.endswith("weight"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())


BAD = [
    ("not json\n", "line 1: not JSON"),
    ('[1, 2]\n', "line 1: a record is a JSON object"),
    ('{"context": "c", "input": "q", "answers": ["a"]}\n{"context": "c", "answers": ["a"]}\n', "line 2: field 'input' is missing"),
    ('{"context": "c", "input": "q", "answers": "a"}\n', "line 1: field 'answers' must be a list, not str"),
    ('{"context": "c", "input": "q", "answers": []}\n', "line 1: field 'answers' must be a non-empty list of strings"),
    ('{"context": 3, "input": "q", "answers": ["a"]}\n', "line 1: field 'context' must be a string, not int"),
    ('{"context": "c", "input": "q", "answers": ["a"], "length": "long"}\n', "line 1: field 'length' must be an integer, not str"),
    ("\n\n", "holds no records"),
]


@pytest.mark.parametrize("content, message", BAD)
@pytest.mark.parametrize("script", ["eval.py", "train.py"])
def test_malformed_data_is_one_line_and_exit_2(tmp_path, content, message, script):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    args = ("longbench", "--data", data) if script == "eval.py" else ("ert", "--data", data, "--run-dir", tmp_path)
    r = run(script, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


def test_missing_data_file_and_missing_flag_are_one_line(tmp_path):
    for r, message in ((run("eval.py", "longbench"), "give --data FILE.jsonl"),
                       (run("eval.py", "longbench", "--data", tmp_path / "none.jsonl"), "no such file")):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


def test_a_tokenizer_without_eos_is_one_line_and_exit_2(mistral_dir, tmp_path):
    import shutil

    import sentencepiece as spm

    d = tmp_path / "no_eos"
    shutil.copytree(mistral_dir, d)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some words to train on"] * 200), model_prefix=str(d / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, eos_id=-1, pad_id=-1,
                                   minloglevel=2)
    data = write_jsonl(tmp_path / "own.jsonl", narrative_records(2))
    for script, args in (("eval.py", ("longbench", "--model", d, "--data", data)),
                         ("train.py", ("ert", "--model", d, "--data", data, "--run-dir", tmp_path))):
        r = run(script, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "has no EOS token" in lines[0], r.stderr
