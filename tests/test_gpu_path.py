"""The kernel path end to end: generate.py and eval.py on the embedded model through the Triton kernels (interpreted
on CPU, compiled on CUDA) give what the torch path gives, and a decode step really runs through the kernels.

Oracle: the torch backend on the same command. Tolerance on logits: the fp32 one of tests/test_kernels.py's model
test, 1e-5 x the largest logit. kernels.CALLS counts the Triton launches; a decode step of an L-layer NF4 model
must launch exactly 7 L NF4 gemvs (wq, wk, wv, wo, w1, w2, w3), L fused RoPE + cache writes and L paged decode
attentions, so the test fails if any of the three is unwired.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from tinytis import kernels
import tinytis.engine
from tinytis.model import Transformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import eval as eval_cli  # noqa: E402
import generate  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET unset: run through tests/conftest.py", allow_module_level=True)
if not (ROOT / "models/tiny/config.json").exists():
    pytest.skip("the embedded model is not there (being trained)", allow_module_level=True)

PROMPT = "The grass is green. The pass key is 4721. Remember it. The sky is blue. What is the pass key? The pass key is"
NEW_TOKENS = 16
REAL_LOGITS, REAL_LOOP = Transformer.logits, tinytis.engine.decode_loop


def run_generate(backend, monkeypatch, capsys):
    """generate.py --quant nf4, policy tis at budget 0.25 and a decode budget, on this backend ->
    (new tokens, logits of every step, kernel launches of the decode loop)."""
    monkeypatch.setattr(kernels, "BACKEND", backend)
    logits, decode_calls, tokens = [], {}, []

    def record_logits(model, h):
        logits.append(REAL_LOGITS(model, h))
        return logits[-1]

    def counted_loop(model, cache, logits, next_pos, params, eos_id, *args):
        before = kernels.CALLS.copy()
        out = REAL_LOOP(model, cache, logits, next_pos, params, None, *args)  # past EOS: all NEW_TOKENS steps
        decode_calls.update(kernels.CALLS - before)
        tokens.extend(out[0][0])
        return out

    monkeypatch.setattr(Transformer, "logits", record_logits)
    monkeypatch.setattr(tinytis.engine, "decode_loop", counted_loop)
    args = generate.parse_args(["--prompt", PROMPT, "--quant", "nf4", "--policy", "tis", "--budget", "0.25",
                                "--decode-budget", "0.25", "--decode-buffer", "4",
                                "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"])
    generate.run(args, PROMPT)
    assert "[tinytis]" in capsys.readouterr().out
    return tokens, torch.stack(logits), decode_calls


def test_generate_nf4_tis_through_the_kernels_matches_torch(monkeypatch, capsys):
    ref_tokens, ref_logits, ref_calls = run_generate("torch", monkeypatch, capsys)
    tokens, logits, calls = run_generate("triton", monkeypatch, capsys)
    assert len(ref_tokens) == NEW_TOKENS  # no EOS: every step decoded
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    assert ref_calls == {}  # the torch backend launches no Triton kernel
    L, steps = 4, NEW_TOKENS - 1  # the last token is sampled, not fed
    assert calls == {"nf4_gemv": 7 * L * steps, "rope_cache_write": L * steps, "paged_decode_attention": L * steps}


def run_eval(backend, out: Path, monkeypatch):
    monkeypatch.setattr(kernels, "BACKEND", backend)
    monkeypatch.setattr(sys, "argv", ["eval.py", "niah", "--policies", "tis,h2o", "--budgets", "0.25", "--lengths", "128",
                                      "--depths", "0.5", "--n-samples", "1", "--threads", "1", "--device", "cpu",
                                      "--output", str(out)])
    before = kernels.CALLS.copy()
    eval_cli.main()
    return out.read_text(), kernels.CALLS - before


def test_eval_through_the_kernels_gives_the_torch_csv(tmp_path, monkeypatch):
    """One task (niah: three variants), two policies (tis records nothing, h2o the attention mass), one budget."""
    ref_csv, ref_calls = run_eval("torch", tmp_path / "torch.csv", monkeypatch)
    csv, calls = run_eval("triton", tmp_path / "triton.csv", monkeypatch)
    assert csv == ref_csv
    score = csv.splitlines()[0].split(",").index("score")
    assert "1.0" in {row.split(",")[score] for row in csv.splitlines()[1:]}  # some answer right: the scores say something
    assert ref_calls == {}
    assert set(calls) == {"rope_cache_write", "paged_decode_attention"}  # eval.py runs the fp32 model: no NF4
    assert calls["rope_cache_write"] == calls["paged_decode_attention"] > 0
